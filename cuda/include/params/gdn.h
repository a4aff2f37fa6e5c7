/* Gated DeltaNet chunk scan: written by the GDN family. */
#ifndef NATSL_PARAMS_GDN_H
#define NATSL_PARAMS_GDN_H
#endif
