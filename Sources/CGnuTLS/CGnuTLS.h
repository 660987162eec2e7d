#ifndef SPINDLE_CGNUTLS_H
#define SPINDLE_CGNUTLS_H
// GnuTLS: TLS for NBD (NBD_OPT_STARTTLS) with X.509 certificates or pre-shared keys.
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

// gnutls_malloc and gnutls_free are variables behind a function-like macro, which Swift cannot
// call as written; these call them as C does.
static inline void *spindle_gnutls_malloc(size_t bytes) { return gnutls_malloc(bytes); }
static inline void spindle_gnutls_free(void *pointer) { gnutls_free(pointer); }
#endif
