/* Block-sparse flash softmax: written by the sparse family. */
#ifndef NATSL_PARAMS_SPARSE_H
#define NATSL_PARAMS_SPARSE_H
#endif
