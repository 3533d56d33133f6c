/* Chained page keys in one call: the loop of kvstore.page_keys.page_keys in C.
 *
 *   key[-1] = seed (16 bytes)
 *   key[i]  = BLAKE2b(digest 16 bytes, key = key[i-1], data = page i)
 *
 * BLAKE2b as specified in RFC 7693: keyed, so the first block is the 16-byte
 * key zero-padded to 128 bytes and the page follows in the next block(s).
 * The result equals Python's hashlib.blake2b(page, digest_size=16, key=prev)
 * byte for byte (tests/kvstore/test_page_keys.py compares them). The chain is
 * sequential, so the gain is only the per-page interpreter and object cost.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define OUT 16

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

/* Message word order of each round (rounds 10 and 11 reuse rows 0 and 1). */
static const uint8_t SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

static inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian hosts only: checked by kvstore.key_chain at load */
    return v;
}

#define G(a, b, c, d, x, y)          \
    do {                             \
        a = a + b + (x);             \
        d = rotr(d ^ a, 32);         \
        c = c + d;                   \
        b = rotr(b ^ c, 24);         \
        a = a + b + (y);             \
        d = rotr(d ^ a, 16);         \
        c = c + d;                   \
        b = rotr(b ^ c, 63);         \
    } while (0)

/* One compression of a full 128-byte block; t = bytes hashed so far incl. this block. */
static void compress(uint64_t h[8], const uint8_t block[BLOCK], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = IV[i]; }
    v[12] ^= t;            /* counter, low word (pages are far below 2**64 bytes) */
    if (last) v[14] = ~v[14];
    /* Unrolled, every SIGMA index is a constant and m[] stays in registers (3x faster). */
    _Pragma("GCC unroll 12") for (int r = 0; r < 12; r++) {
        const uint8_t *s = SIGMA[r % 10];
        G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* BLAKE2b-128 of data[0:len] keyed with key[0:16]; len > 0. */
static void keyed_digest(const uint8_t key[OUT], const uint8_t *data, uint64_t len, uint8_t out[OUT]) {
    uint64_t h[8];
    uint8_t block[BLOCK];
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ ((uint64_t)OUT << 8) ^ OUT; /* fanout 1, depth 1, key and digest length */
    memset(block, 0, BLOCK);
    memcpy(block, key, OUT);
    uint64_t t = BLOCK;
    compress(h, block, t, 0);
    /* Every block but the last is full; the last (1..128 bytes) is zero-padded. */
    while (len > BLOCK) {
        t += BLOCK;
        compress(h, data, t, 0);
        data += BLOCK;
        len -= BLOCK;
    }
    memset(block, 0, BLOCK);
    memcpy(block, data, len);
    compress(h, block, t + len, 1);
    memcpy(out, h, OUT);
}

/* keys[i*16 .. i*16+16) = key of page i of data (num_pages pages of page_bytes each). */
void kvstore_key_chain(const uint8_t *seed, const uint8_t *data, uint64_t page_bytes,
                       uint64_t num_pages, uint8_t *keys) {
    const uint8_t *prev = seed;
    for (uint64_t i = 0; i < num_pages; i++) {
        keyed_digest(prev, data + i * page_bytes, page_bytes, keys + i * OUT);
        prev = keys + i * OUT;
    }
}
