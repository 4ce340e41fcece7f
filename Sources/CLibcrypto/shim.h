#ifndef PAYOP_IPND_CLIBCRYPTO_SHIM_H
#define PAYOP_IPND_CLIBCRYPTO_SHIM_H
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#endif
