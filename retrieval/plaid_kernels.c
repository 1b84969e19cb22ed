/* PLAID's two search kernels, single-threaded, for ctypes (retrieval/native.py builds this file
 * with the system C compiler into the cache dir; no Python or torch headers).
 *
 * They compute what colbert-ai 0.2.22's filter_pids.cpp and decompress_residuals.cpp compute, in
 * less time: a passage's repeated centroid codes are skipped with a per-call stamp array instead
 * of a std::unordered_set per passage, the inner loops run over contiguous rows, and
 * decompression reads one precombined [256][vals_per_byte] table and normalizes as it writes.
 * tests/test_plaid.py checks both against colbert-ai's kernels and the pure-torch paths.
 */
#include <math.h>
#include <stdint.h>

/* Centroid interaction of every passage in ids[0..n): out[i] = sum over the nq query vectors of
 * the best score[code][q] over the passage's codes (only codes with keep[code] != 0 when keep is
 * given; a passage with none scores nq * -9999, as in colbert-ai). stamp: ncentroids zeros,
 * scratch. score: [ncentroids][nq] row-major. nq <= 1024. */
void plaid_centroid_interaction(int64_t n, const int32_t *ids, const float *score, int64_t nq,
                                const int32_t *codes, const int64_t *offsets,
                                const int64_t *doclens, const uint8_t *keep, int32_t *stamp,
                                float *out) {
    float best[1024];
    for (int64_t i = 0; i < n; i++) {
        const int32_t mark = (int32_t)(i + 1);
        const int64_t id = ids[i];
        const int32_t *c = codes + offsets[id];
        const int64_t len = doclens[id];
        for (int64_t q = 0; q < nq; q++) best[q] = -9999.0f;
        for (int64_t j = 0; j < len; j++) {
            const int32_t code = c[j];
            if ((keep && !keep[code]) || stamp[code] == mark) continue;
            stamp[code] = mark;
            const float *row = score + (int64_t)code * nq;
            for (int64_t q = 0; q < nq; q++) best[q] = row[q] > best[q] ? row[q] : best[q];
        }
        float total = 0.0f;
        for (int64_t q = 0; q < nq; q++) total += best[q];
        out[i] = total;
    }
}

/* The L2-normalized vectors of every passage in ids[0..n), one passage after another, into out:
 * centroid[code] + the residual, whose packed byte b at position k expands to
 * table[b][0..per_byte) at dimensions k*per_byte... */
void plaid_decompress(int64_t n, const int32_t *ids, const int64_t *offsets,
                      const int64_t *doclens, const uint8_t *residuals, const int32_t *codes,
                      const float *centroids, const float *table, int64_t dim, int64_t per_byte,
                      float *out) {
    const int64_t packed = dim / per_byte;
    for (int64_t i = 0; i < n; i++) {
        const int64_t id = ids[i];
        for (int64_t t = offsets[id]; t < offsets[id] + doclens[id]; t++) {
            const uint8_t *r = residuals + t * packed;
            const float *c = centroids + (int64_t)codes[t] * dim;
            float norm = 0.0f;
            for (int64_t k = 0; k < packed; k++) {
                const float *v = table + (int64_t)r[k] * per_byte;
                for (int64_t l = 0; l < per_byte; l++) {
                    const float x = c[k * per_byte + l] + v[l];
                    out[k * per_byte + l] = x;
                    norm += x * x;
                }
            }
            const float scale = norm > 0.0f ? 1.0f / sqrtf(norm) : 0.0f;
            for (int64_t d = 0; d < dim; d++) out[d] *= scale;
            out += dim;
        }
    }
}

/* MaxSim of n passages from their token-by-query scores sims [tokens][nq] (passage i's tokens
 * are lens[i] consecutive rows): out[i] = sum over q of the max over its rows (0 if none). */
void plaid_segment_maxsim(int64_t n, const int64_t *lens, const float *sims, int64_t nq,
                          float *out) {
    float best[1024];
    for (int64_t i = 0; i < n; i++) {
        for (int64_t q = 0; q < nq; q++) best[q] = -INFINITY;
        for (int64_t j = 0; j < lens[i]; j++, sims += nq)
            for (int64_t q = 0; q < nq; q++) best[q] = sims[q] > best[q] ? sims[q] : best[q];
        float total = 0.0f;
        for (int64_t q = 0; q < nq; q++) total += lens[i] ? best[q] : 0.0f;
        out[i] = total;
    }
}
