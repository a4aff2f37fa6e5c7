"""natsl: NAtS-L hybrid attention kernels (Gated DeltaNet chunk scan, block-sparse
flash softmax) for torch, over natsl's C ABI.

`natsl.torch_ops` registers the torch custom ops (imports torch); `natsl._capi` is the
ctypes layer alone.
"""

from ._capi import NatslError, version  # noqa: F401

__version__ = "0.1.0"
