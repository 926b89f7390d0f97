/* Batch ZFile block codec (FORMATS.md §0.3 raw CRC32C, §4.5 blocks, algorithms, CRC).
 *
 * One call checks and decodes (or encodes and checksums) a whole run of ZFile blocks with
 * the GIL released for the whole run, calling the system liblz4 / libzstd. The per-block
 * CRC is the raw CRC32C (no inversions) seeded with 100007, over the stored compressed
 * bytes, stored u32 LE after them; it runs on the SSE4.2 crc32 instruction when the CPU
 * has it, else on a slicing-by-8 table.
 *
 * Optional: obd.formats.codecs falls back to ctypes / Python packages when this module is
 * not built (or OBD_NO_EXT is set). Both paths must give the same bytes and the same
 * bad-block reports; tests/test_codecs_batch.py holds them to it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lz4.h>
#include <zstd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define ZB_X86 1
#endif

#define ALGO_LZ4 1
#define ALGO_ZSTD 2
#define SEED_BLOCK 100007u

/* Problem codes reported per block (codecs.py maps them to its PROBLEM_* strings). */
#define BAD_CRC 1
#define BAD_DECODE 2
#define BAD_SIZE 3

/* ------------------------------------------------------------------ raw CRC32C */

static uint32_t crc_table[8][256];
static int crc_hw_ok;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
#ifdef ZB_X86
    __builtin_cpu_init();
    crc_hw_ok = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t n)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (n && ((uintptr_t)p & 7)) {
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^
              crc_table[5][(w >> 16) & 0xFF] ^ crc_table[4][(w >> 24) & 0xFF] ^
              crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
              crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
#endif
    while (n--)
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#ifdef ZB_X86
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n)
{
#ifdef __x86_64__
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
#endif
    while (n--)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

/* Raw CRC32C: the register starts at `seed`, no inversion on entry or exit. */
static uint32_t crc_raw(uint32_t seed, const uint8_t *p, size_t n)
{
#ifdef ZB_X86
    if (crc_hw_ok)
        return crc_hw(seed, p, n);
#endif
    return crc_sw(seed, p, n);
}

static uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void store_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* ------------------------------------------------- per-thread zstd contexts */

typedef struct {
    ZSTD_CCtx *c;
    ZSTD_DCtx *d;
} zctx;

static pthread_key_t zctx_key;

static void zctx_free(void *p)
{
    zctx *z = p;
    if (z) {
        ZSTD_freeCCtx(z->c);
        ZSTD_freeDCtx(z->d);
        free(z);
    }
}

/* This thread's contexts (freed when the thread ends); NULL with MemoryError set. */
static zctx *zctx_get(int want_c, int want_d)
{
    zctx *z = pthread_getspecific(zctx_key);
    if (!z) {
        z = calloc(1, sizeof *z);
        if (!z || pthread_setspecific(zctx_key, z) != 0) {
            free(z);
            PyErr_NoMemory();
            return NULL;
        }
    }
    if (want_c && !z->c)
        z->c = ZSTD_createCCtx();
    if (want_d && !z->d)
        z->d = ZSTD_createDCtx();
    if ((want_c && !z->c) || (want_d && !z->d)) {
        PyErr_NoMemory();
        return NULL;
    }
    return z;
}

/* ------------------------------------------------------------ argument helpers */

/* Copy jump-table lengths (a buffer of 4- or 8-byte integers, or a sequence of ints)
 * into a new int64 array. Returns 0, or -1 with an exception set. */
static int get_lengths(PyObject *obj, int64_t **out, Py_ssize_t *count)
{
    Py_buffer b;
    *out = NULL;
    *count = 0;
    if (PyObject_CheckBuffer(obj) && PyObject_GetBuffer(obj, &b, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0) {
        const char *f = b.format ? b.format : "B";
        if (*f == '@' || *f == '=' || *f == '<')
            f++;
        int ok = f[0] && !f[1] && strchr("bBhHiIlLqQ", f[0]) && (b.itemsize == 1 || b.itemsize == 2 || b.itemsize == 4 || b.itemsize == 8);
        int is_signed = ok && strchr("bhilq", f[0]) != NULL;
        if (!ok) {
            PyBuffer_Release(&b);
            PyErr_Format(PyExc_TypeError, "lengths: integer buffer expected, got format %s", b.format ? b.format : "B");
            return -1;
        }
        Py_ssize_t n = b.len / b.itemsize;
        int64_t *v = malloc((size_t)(n ? n : 1) * sizeof *v);
        if (!v) {
            PyBuffer_Release(&b);
            PyErr_NoMemory();
            return -1;
        }
        const uint8_t *p = b.buf;
        for (Py_ssize_t i = 0; i < n; i++, p += b.itemsize) {
            switch (b.itemsize) {
            case 1: v[i] = is_signed ? (int64_t) * (const int8_t *)p : (int64_t) * (const uint8_t *)p; break;
            case 2: { uint16_t x; memcpy(&x, p, 2); v[i] = is_signed ? (int64_t)(int16_t)x : (int64_t)x; break; }
            case 4: { uint32_t x; memcpy(&x, p, 4); v[i] = is_signed ? (int64_t)(int32_t)x : (int64_t)x; break; }
            default: { uint64_t x; memcpy(&x, p, 8); v[i] = (int64_t)x; if (!is_signed && x > INT64_MAX) v[i] = -1; break; }
            }
        }
        PyBuffer_Release(&b);
        *out = v;
        *count = n;
        return 0;
    }
    PyErr_Clear();
    PyObject *seq = PySequence_Fast(obj, "lengths: a sequence or buffer of integers expected");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int64_t *v = malloc((size_t)(n ? n : 1) * sizeof *v);
    if (!v) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long x = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (x == -1 && PyErr_Occurred()) {
            free(v);
            Py_DECREF(seq);
            return -1;
        }
        v[i] = x;
    }
    Py_DECREF(seq);
    *out = v;
    *count = n;
    return 0;
}

static int check_algo(int algo)
{
    if (algo != ALGO_LZ4 && algo != ALGO_ZSTD) {
        PyErr_Format(PyExc_ValueError, "unsupported algorithm id %d", algo);
        return -1;
    }
    return 0;
}

/* Sum of the lengths, or -1 (ValueError set) if one is negative or, with crc, shorter
 * than its CRC. */
static int64_t sum_lengths(const int64_t *lens, Py_ssize_t n, int crc)
{
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (lens[i] < 0 || lens[i] > ((int64_t)1 << 40)) {
            PyErr_SetString(PyExc_ValueError, "stored record length out of range");
            return -1;
        }
        if (crc && lens[i] < 4) {
            PyErr_SetString(PyExc_ValueError, "stored record shorter than its CRC");
            return -1;
        }
        total += lens[i];
    }
    return total;
}

/* Decode one stored body into dst (capacity and wanted size `want`): 0 or a BAD_* code. */
static int decode_one(int algo, ZSTD_DCtx *d, const uint8_t *src, size_t body, uint8_t *dst, size_t want)
{
    if (algo == ALGO_LZ4) {
        if (body > (size_t)INT_MAX || want > (size_t)INT_MAX)
            return BAD_DECODE;
        int r = LZ4_decompress_safe((const char *)src, (char *)dst, (int)body, (int)want);
        return r < 0 ? BAD_DECODE : (size_t)r != want ? BAD_SIZE : 0;
    }
    size_t r = ZSTD_decompressDCtx(d, dst, want, src, body);
    return ZSTD_isError(r) ? BAD_DECODE : r != want ? BAD_SIZE : 0;
}

/* ------------------------------------------------------------------- functions */

PyDoc_STRVAR(decompress_blocks_doc,
"decompress_blocks(algo, stored, lengths, out, block_size, last_raw, crc) -> [(i, code)]\n\n"
"Check (with crc) and decode consecutive stored records into out, block i at\n"
"i*block_size; the last decodes to last_raw bytes. Returns (index, code) of every\n"
"failed block: 1 CRC mismatch, 2 decompression failed, 3 wrong size.");

static PyObject *zb_decompress_blocks(PyObject *self, PyObject *args)
{
    int algo, crc;
    Py_buffer src, out;
    PyObject *lens_obj, *result = NULL;
    Py_ssize_t bs, last_raw, n = 0;
    int64_t *lens = NULL, *bad = NULL;
    Py_ssize_t nbad = 0;
    zctx *z = NULL;

    if (!PyArg_ParseTuple(args, "iy*Ow*nnp", &algo, &src, &lens_obj, &out, &bs, &last_raw, &crc))
        return NULL;
    if (check_algo(algo) < 0 || get_lengths(lens_obj, &lens, &n) < 0)
        goto done;
    if (n == 0) {
        result = PyList_New(0);
        goto done;
    }
    int64_t total = sum_lengths(lens, n, crc);
    if (total < 0)
        goto done;
    if (total > src.len) {
        PyErr_SetString(PyExc_ValueError, "stored buffer shorter than the records it should hold");
        goto done;
    }
    if (bs <= 0 || last_raw < 0 || last_raw > bs || (n - 1) > (PY_SSIZE_T_MAX - last_raw) / bs ||
        (n - 1) * bs + last_raw > out.len) {
        PyErr_SetString(PyExc_ValueError, "output buffer too small for the blocks");
        goto done;
    }
    if (algo == ALGO_ZSTD && !(z = zctx_get(0, 1)))
        goto done;
    bad = malloc((size_t)n * sizeof *bad);
    if (!bad) {
        PyErr_NoMemory();
        goto done;
    }

    Py_BEGIN_ALLOW_THREADS
    const uint8_t *s = src.buf;
    uint8_t *o = out.buf;
    ZSTD_DCtx *d = z ? z->d : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        size_t body = (size_t)lens[i] - (crc ? 4 : 0);
        size_t want = i == n - 1 ? (size_t)last_raw : (size_t)bs;
        int code = 0;
        if (crc && crc_raw(SEED_BLOCK, s, body) != load_le32(s + body))
            code = BAD_CRC;
        else
            code = decode_one(algo, d, s, body, o + (size_t)i * (size_t)bs, want);
        if (code)
            bad[nbad++] = (int64_t)i << 2 | code;
        s += lens[i];
    }
    Py_END_ALLOW_THREADS

    result = PyList_New(nbad);
    for (Py_ssize_t k = 0; result && k < nbad; k++) {
        PyObject *t = Py_BuildValue("(Li)", (long long)(bad[k] >> 2), (int)(bad[k] & 3));
        if (!t) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, k, t);
    }
done:
    free(lens);
    free(bad);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(decompress_doc,
"decompress(algo, stored, raw_size) -> bytes | int\n\n"
"Decode one stored body (no CRC) to exactly raw_size bytes, or return the problem code.");

static PyObject *zb_decompress(PyObject *self, PyObject *args)
{
    int algo;
    Py_buffer src;
    Py_ssize_t raw;
    PyObject *result = NULL;
    zctx *z = NULL;
    if (!PyArg_ParseTuple(args, "iy*n", &algo, &src, &raw))
        return NULL;
    if (check_algo(algo) < 0)
        goto done;
    if (raw < 0) {
        PyErr_SetString(PyExc_ValueError, "negative raw size");
        goto done;
    }
    if (algo == ALGO_ZSTD && !(z = zctx_get(0, 1)))
        goto done;
    result = PyBytes_FromStringAndSize(NULL, raw);
    if (!result)
        goto done;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = decode_one(algo, z ? z->d : NULL, src.buf, (size_t)src.len, (uint8_t *)PyBytes_AS_STRING(result), (size_t)raw);
    Py_END_ALLOW_THREADS
    if (code) {
        Py_DECREF(result);
        result = PyLong_FromLong(code);
    }
done:
    PyBuffer_Release(&src);
    return result;
}

PyDoc_STRVAR(bound_doc, "bound(algo, raw_size) -> int: largest stored size (no CRC) of a block.");

static size_t bound_of(int algo, size_t raw)
{
    if (algo == ALGO_LZ4)
        return raw > LZ4_MAX_INPUT_SIZE ? 0 : (size_t)LZ4_compressBound((int)raw);
    return ZSTD_compressBound(raw);
}

static PyObject *zb_bound(PyObject *self, PyObject *args)
{
    int algo;
    Py_ssize_t raw;
    if (!PyArg_ParseTuple(args, "in", &algo, &raw) || check_algo(algo) < 0)
        return NULL;
    if (raw < 0) {
        PyErr_SetString(PyExc_ValueError, "negative raw size");
        return NULL;
    }
    return PyLong_FromSize_t(bound_of(algo, (size_t)raw));
}

PyDoc_STRVAR(compress_blocks_doc,
"compress_blocks(algo, data, block_size, crc, out, level) -> (used, [lengths])\n\n"
"Compress consecutive block_size chunks of data (the last may be short) into out,\n"
"back to back, each followed by its CRC when crc. out must hold\n"
"nblocks * (bound(block_size) + 4) bytes. An empty input gives no block for LZ4 and\n"
"one empty frame for zstd.");

static PyObject *zb_compress_blocks(PyObject *self, PyObject *args)
{
    int algo, crc, level;
    Py_buffer src, out;
    Py_ssize_t bs;
    PyObject *result = NULL, *lst = NULL;
    int64_t *lens = NULL;
    zctx *z = NULL;

    if (!PyArg_ParseTuple(args, "iy*npw*i", &algo, &src, &bs, &crc, &out, &level))
        return NULL;
    if (check_algo(algo) < 0)
        goto done;
    if (bs <= 0) {
        PyErr_SetString(PyExc_ValueError, "block size must be positive");
        goto done;
    }
    size_t size = (size_t)src.len;
    size_t nblocks = (size + (size_t)bs - 1) / (size_t)bs;
    if (algo == ALGO_ZSTD && nblocks == 0)
        nblocks = 1;
    size_t cap = bound_of(algo, (size_t)bs);
    if (cap == 0) {
        PyErr_SetString(PyExc_ValueError, "block size too large for LZ4");
        goto done;
    }
    if (nblocks && (cap + 4) > (size_t)out.len / nblocks) {
        PyErr_SetString(PyExc_ValueError, "output buffer too small for the compressed blocks");
        goto done;
    }
    if (algo == ALGO_ZSTD && !(z = zctx_get(1, 0)))
        goto done;
    lens = malloc((nblocks ? nblocks : 1) * sizeof *lens);
    if (!lens) {
        PyErr_NoMemory();
        goto done;
    }
    int failed = 0;
    size_t pos = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *s = src.buf;
    uint8_t *o = out.buf;
    for (size_t i = 0; i < nblocks; i++) {
        size_t off = i * (size_t)bs;
        size_t len = size - off < (size_t)bs ? size - off : (size_t)bs;
        size_t got;
        if (algo == ALGO_LZ4) {
            int r = LZ4_compress_default((const char *)s + off, (char *)o + pos, (int)len, (int)cap);
            if (r <= 0) {
                failed = 1;
                break;
            }
            got = (size_t)r;
        } else {
            got = ZSTD_compressCCtx(z->c, o + pos, cap, s + off, len, level);
            if (ZSTD_isError(got)) {
                failed = 1;
                break;
            }
        }
        if (crc) {
            store_le32(o + pos + got, crc_raw(SEED_BLOCK, o + pos, got));
            got += 4;
        }
        lens[i] = (int64_t)got;
        pos += got;
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_ValueError, algo == ALGO_LZ4 ? "LZ4 compression failed" : "zstd compression failed");
        goto done;
    }
    lst = PyList_New((Py_ssize_t)nblocks);
    for (size_t i = 0; lst && i < nblocks; i++) {
        PyObject *v = PyLong_FromLongLong(lens[i]);
        if (!v) {
            Py_CLEAR(lst);
            break;
        }
        PyList_SET_ITEM(lst, (Py_ssize_t)i, v);
    }
    if (lst)
        result = Py_BuildValue("(nN)", (Py_ssize_t)pos, lst);
done:
    free(lens);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(bad_crcs_doc,
"bad_crcs(stored, lengths) -> [i]\n\n"
"Indices of the records (CRC included in lengths) whose per-block CRC fails.");

static PyObject *zb_bad_crcs(PyObject *self, PyObject *args)
{
    Py_buffer src;
    PyObject *lens_obj, *result = NULL;
    int64_t *lens = NULL, *bad = NULL;
    Py_ssize_t n = 0, nbad = 0;
    if (!PyArg_ParseTuple(args, "y*O", &src, &lens_obj))
        return NULL;
    if (get_lengths(lens_obj, &lens, &n) < 0)
        goto done;
    int64_t total = sum_lengths(lens, n, 1);
    if (total < 0)
        goto done;
    if (total > src.len) {
        PyErr_SetString(PyExc_ValueError, "stored buffer shorter than the records it should hold");
        goto done;
    }
    bad = malloc((size_t)(n ? n : 1) * sizeof *bad);
    if (!bad) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *s = src.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        size_t body = (size_t)lens[i] - 4;
        if (crc_raw(SEED_BLOCK, s, body) != load_le32(s + body))
            bad[nbad++] = i;
        s += lens[i];
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(nbad);
    for (Py_ssize_t k = 0; result && k < nbad; k++) {
        PyObject *v = PyLong_FromLongLong(bad[k]);
        if (!v) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, k, v);
    }
done:
    free(lens);
    free(bad);
    PyBuffer_Release(&src);
    return result;
}

PyDoc_STRVAR(crc32c_doc,
"crc32c(data, seed=0, table=False) -> int\n\n"
"Raw CRC32C of data (no inversions) from register value seed; table=True forces the\n"
"table code even where the CPU has the crc32 instruction (for tests).");

static PyObject *zb_crc32c(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"data", "seed", "table", NULL};
    Py_buffer b;
    unsigned int seed = 0;
    int table = 0;
    uint32_t r;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|Ip", names, &b, &seed, &table))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = table ? crc_sw(seed, b.buf, (size_t)b.len) : crc_raw(seed, b.buf, (size_t)b.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(r);
}

static PyMethodDef zb_methods[] = {
    {"decompress_blocks", zb_decompress_blocks, METH_VARARGS, decompress_blocks_doc},
    {"decompress", zb_decompress, METH_VARARGS, decompress_doc},
    {"compress_blocks", zb_compress_blocks, METH_VARARGS, compress_blocks_doc},
    {"bad_crcs", zb_bad_crcs, METH_VARARGS, bad_crcs_doc},
    {"bound", zb_bound, METH_VARARGS, bound_doc},
    {"crc32c", (PyCFunction)(void (*)(void))zb_crc32c, METH_VARARGS | METH_KEYWORDS, crc32c_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef zb_module = {
    PyModuleDef_HEAD_INIT, "_zbatch",
    "Batch ZFile block codec: CRC check and LZ4 / zstd over runs of blocks, GIL released.",
    -1, zb_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__zbatch(void)
{
    crc_init();
    if (pthread_key_create(&zctx_key, zctx_free) != 0)
        return PyErr_NoMemory();
    PyObject *m = PyModule_Create(&zb_module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "HW_CRC", crc_hw_ok) < 0 ||
        PyModule_AddIntConstant(m, "LZ4_VERSION", LZ4_versionNumber()) < 0 ||
        PyModule_AddIntConstant(m, "ZSTD_VERSION", (long)ZSTD_versionNumber()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
