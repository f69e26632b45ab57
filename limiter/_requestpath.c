/* The request path of RateLimiter.allow_request, compiled (optional; see limiter/compiled.py).
 *
 * A Decider is called as allow_request(client_id, request) -> bool. It does what the pure-Python
 * closure built by RateLimiter._build_allow_request does, step for step and with the same float
 * arithmetic (compiled with -ffp-contract=off: no fused multiply-add), for one policy whose
 * algorithm's cost-1 step is written out there: id check, request.timestamp, clock(), stale and
 * future checks, hash(), the shard's lock, the linear probe, the step. Everything else calls
 * back into Python, as the closure does: an insert (shard.insert, then set_key when keyed), the
 * algorithm's consume() when the written-out step does not apply. A call it does not take at all
 * (not an exact str id or an id of a length out of range, a timestamp that is not a float) goes
 * to the closure itself ("fallback") before the clock is read, so the clock is read once per
 * call either way.
 *
 * The shard's arrays are read through the buffer protocol from the shard's kv (int64 keys),
 * rv (int32 rows) and v0 (the first group's cells: float64, or uint32 for the sliding log)
 * memoryviews; the buffers are kept per shard and taken again when the shard swaps an array
 * (growth), which it only does under its lock. Holding the buffers keeps those arrays alive.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* kinds: position + 1 in limiter/ratelimiter.py WRITTEN_OUT */
enum { K_LOG = 1, K_LEASE = 2, K_GCRA = 3, K_BUCKET = 4, K_FIXED = 5, K_SLIDING = 6 };

typedef struct {
    PyObject *kv_obj; /* the memoryviews the buffers below come from (NULL: none yet) */
    PyObject *v0_obj;
    Py_buffer kv, rv, v0;
    int has_rv;
    uint64_t mask;
    Py_ssize_t slots, cells; /* index slots; cells in v0 */
    PyObject *acquire, *release; /* the shard lock's bound methods */
} ShardCache;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fallback, *clock, *shards, *consume, *set_key;
    Py_ssize_t nshards;
    ShardCache *cache;
    uint64_t shard_mask;
    int shift, kind;
    Py_ssize_t width, max_id;
    double max_age, max_skew;
    double window, capacity, flimit, interval, tolerance, rate;
    double log_scale, log_wait, log_unit, log_offset, log_max_tick;
    Py_ssize_t log_last, log_exact_base, expiry, tokens, admitted, rejected;
} Decider;

static PyObject *s_timestamp, *s_kv, *s_rv, *s_v0, *s_mask, *s_insert, *s_lock, *s_acquire,
    *s_release;

static void
cache_release_index(ShardCache *c)
{
    if (c->kv_obj != NULL) {
        PyBuffer_Release(&c->kv);
        Py_CLEAR(c->kv_obj);
    }
    if (c->has_rv) {
        PyBuffer_Release(&c->rv);
        c->has_rv = 0;
    }
}

static void
cache_release_cells(ShardCache *c)
{
    if (c->v0_obj != NULL) {
        PyBuffer_Release(&c->v0);
        Py_CLEAR(c->v0_obj);
    }
}

/* Take the shard's index buffers again when its kv array is not the cached one. */
static int
refresh_index(ShardCache *c, PyObject *shard)
{
    PyObject *kv_obj = PyObject_GetAttr(shard, s_kv);
    if (kv_obj == NULL)
        return -1;
    if (kv_obj == c->kv_obj) {
        Py_DECREF(kv_obj);
        return 0;
    }
    cache_release_index(c);
    if (PyObject_GetBuffer(kv_obj, &c->kv, PyBUF_SIMPLE) < 0) {
        Py_DECREF(kv_obj);
        return -1;
    }
    c->kv_obj = kv_obj;
    PyObject *rv_obj = PyObject_GetAttr(shard, s_rv);
    if (rv_obj == NULL)
        goto fail;
    int got = PyObject_GetBuffer(rv_obj, &c->rv, PyBUF_SIMPLE);
    Py_DECREF(rv_obj); /* the buffer holds its own reference */
    if (got < 0)
        goto fail;
    c->has_rv = 1;
    PyObject *mask_obj = PyObject_GetAttr(shard, s_mask);
    if (mask_obj == NULL)
        goto fail;
    c->mask = PyLong_AsUnsignedLongLong(mask_obj);
    Py_DECREF(mask_obj);
    if (PyErr_Occurred())
        goto fail;
    c->slots = (Py_ssize_t)c->mask + 1;
    if (c->kv.len != c->slots * 8 || c->rv.len != c->slots * 4) {
        PyErr_SetString(PyExc_RuntimeError, "compiled request path: index arrays out of shape");
        goto fail;
    }
    return 0;
fail:
    cache_release_index(c);
    return -1;
}

/* Take the shard's cell buffer again when its v0 array is not the cached one. */
static int
refresh_cells(ShardCache *c, PyObject *shard, Py_ssize_t itemsize)
{
    PyObject *v0_obj = PyObject_GetAttr(shard, s_v0);
    if (v0_obj == NULL)
        return -1;
    if (v0_obj == c->v0_obj) {
        Py_DECREF(v0_obj);
        return 0;
    }
    cache_release_cells(c);
    if (PyObject_GetBuffer(v0_obj, &c->v0, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0) {
        Py_DECREF(v0_obj);
        return -1;
    }
    c->v0_obj = v0_obj;
    c->cells = c->v0.len / itemsize;
    return 0;
}

/* consume(v0, b, now, 1): the algorithm's full step, in Python (the caller holds the lock). */
static int
call_consume(Decider *d, ShardCache *c, Py_ssize_t b, double now)
{
    PyObject *pb = PyLong_FromSsize_t(b);
    PyObject *pnow = PyFloat_FromDouble(now);
    PyObject *one = PyLong_FromLong(1);
    int ok = -1;
    if (pb != NULL && pnow != NULL && one != NULL) {
        PyObject *args[4] = {c->v0_obj, pb, pnow, one};
        PyObject *r = PyObject_Vectorcall(d->consume, args, 4, NULL);
        if (r != NULL) {
            ok = PyObject_IsTrue(r);
            Py_DECREF(r);
        }
    }
    Py_XDECREF(pb);
    Py_XDECREF(pnow);
    Py_XDECREF(one);
    return ok;
}

/* shard.insert(h, now) -> row (< 0: no room), then set_key(shard, row, client_id) if keyed. */
static Py_ssize_t
call_insert(Decider *d, PyObject *shard, PyObject *cid, Py_hash_t h, double now)
{
    PyObject *ph = PyLong_FromSsize_t((Py_ssize_t)h);
    PyObject *pnow = PyFloat_FromDouble(now);
    Py_ssize_t row = -2;
    if (ph != NULL && pnow != NULL) {
        PyObject *args[3] = {shard, ph, pnow};
        /* no PY_VECTORCALL_ARGUMENTS_OFFSET: args[-1] is not ours to lend */
        PyObject *r = PyObject_VectorcallMethod(s_insert, args, 3, NULL);
        if (r != NULL) {
            row = PyLong_AsSsize_t(r);
            Py_DECREF(r);
            if (row == -1 && PyErr_Occurred())
                row = -2;
        }
    }
    Py_XDECREF(ph);
    Py_XDECREF(pnow);
    if (row >= 0 && d->set_key != Py_None) {
        PyObject *prow = PyLong_FromSsize_t(row);
        if (prow == NULL)
            return -2;
        PyObject *args[3] = {shard, prow, cid};
        PyObject *r = PyObject_Vectorcall(d->set_key, args, 3, NULL);
        Py_DECREF(prow);
        if (r == NULL)
            return -2;
        Py_DECREF(r);
    }
    return row;
}

/* The decision under the shard's lock: 1 admit, 0 refuse, -1 error. */
static int
decide_locked(Decider *d, ShardCache *c, PyObject *shard, PyObject *cid, Py_hash_t h, double now)
{
    if (refresh_index(c, shard) < 0)
        return -1;
    const int64_t *kv = (const int64_t *)c->kv.buf;
    uint64_t mask = c->mask;
    uint64_t i = (uint64_t)(h >> d->shift) & mask;
    int64_t k = kv[i];
    Py_ssize_t row;
    for (;;) {
        if (k == (int64_t)h) {
            row = ((const int32_t *)c->rv.buf)[i];
            break;
        }
        if (k == 0) { /* a new client */
            row = call_insert(d, shard, cid, h, now);
            if (row == -2)
                return -1;
            if (row < 0)
                return 0;
            break;
        }
        i = (i + 1) & mask;
        k = kv[i];
    }
    Py_ssize_t itemsize = d->kind == K_LOG ? 4 : 8;
    if (refresh_cells(c, shard, itemsize) < 0)
        return -1;
    Py_ssize_t b = row * d->width;
    if (row < 0 || b + d->width > c->cells) {
        PyErr_SetString(PyExc_RuntimeError, "compiled request path: row out of range");
        return -1;
    }
    if (d->kind == K_LOG) {
        uint32_t *s = (uint32_t *)c->v0.buf;
        uint32_t base = s[b];
        uint32_t head = s[b + 1];
        /* no origin yet, or one before 1970 (now - origin may round): consume() */
        if ((Py_ssize_t)base < d->log_exact_base || (Py_ssize_t)head > d->log_last)
            return call_consume(d, c, b, now);
        double x = (now - ((double)base * d->log_unit - d->log_offset)) * d->log_scale;
        uint32_t v = s[b + 2 + head];
        if (v && (double)v > x - d->log_wait)
            return 0;
        if (0.0 < x && x <= d->log_max_tick) {
            uint32_t t = (uint32_t)x;
            s[b + 2 + head] = (double)t < x ? t + 2 : t + 1;
            s[b + 1] = (Py_ssize_t)head < d->log_last ? head + 1 : 0;
            return 1;
        }
        return call_consume(d, c, b, now);
    }
    double *s = (double *)c->v0.buf;
    switch (d->kind) {
    case K_LEASE:
        if (s[b + d->expiry] > now) {
            double tokens = s[b + d->tokens];
            if (tokens >= 1.0) {
                s[b + d->tokens] = tokens - 1.0;
                s[b + d->admitted] += 1.0;
                return 1;
            }
            s[b + d->rejected] += 1.0;
            return 0;
        }
        break;
    case K_GCRA: {
        double tat = s[b];
        if (tat < now)
            tat = now;
        tat += d->interval;
        if (tat - now <= d->tolerance) {
            s[b] = tat;
            return 1;
        }
        return 0;
    }
    case K_BUCKET: {
        double last = s[b + 1];
        double used = s[b];
        if (now > last) {
            used -= (now - last) * d->rate;
            if (used < 0.0)
                used = 0.0;
        }
        if (used + 1.0 <= d->capacity) {
            s[b] = used + 1.0;
            if (now > last)
                s[b + 1] = now;
            return 1;
        }
        return 0;
    }
    case K_FIXED:
        if (s[b] > now - d->window) {
            double count = s[b + 1] + 1.0;
            if (count <= d->flimit) {
                s[b + 1] = count;
                return 1;
            }
            return 0;
        }
        break;
    case K_SLIDING:
        if (now - s[b] < d->window) {
            double f = (now - s[b]) / d->window;
            if (f < 0.0)
                f = 0.0;
            double cur = s[b + 1];
            if (s[b + 2] * (1.0 - f) + cur + 1.0 <= d->flimit) {
                s[b + 1] = cur + 1.0;
                return 1;
            }
            return 0;
        }
        break;
    }
    return call_consume(d, c, b, now);
}

static PyObject *
decider_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Decider *d = (Decider *)self;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL)
        goto slow;
    PyObject *cid = args[0];
    if (!PyUnicode_CheckExact(cid))
        goto slow;
    Py_ssize_t len = PyUnicode_GET_LENGTH(cid);
    if (len <= 0 || len > d->max_id)
        goto slow;
    PyObject *ts = PyObject_GetAttr(args[1], s_timestamp);
    if (ts == NULL)
        return NULL;
    if (!PyFloat_CheckExact(ts)) {
        Py_DECREF(ts);
        goto slow;
    }
    double now = PyFloat_AS_DOUBLE(ts);
    Py_DECREF(ts);
    PyObject *tv = PyObject_CallNoArgs(d->clock);
    if (tv == NULL)
        return NULL;
    double t = PyFloat_AsDouble(tv);
    Py_DECREF(tv);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    if (now < t - d->max_age || now > t + d->max_skew)
        Py_RETURN_FALSE;
    Py_hash_t h = PyObject_Hash(cid);
    if (h == -1)
        return NULL;
    if (h == 0)
        h = 1;
    Py_ssize_t si = (Py_ssize_t)((uint64_t)h & d->shard_mask);
    ShardCache *c = &d->cache[si];
    PyObject *shard = PyList_GET_ITEM(d->shards, si);
    PyObject *r = PyObject_CallNoArgs(c->acquire);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    int ok = decide_locked(d, c, shard, cid, h, now);
    /* release whatever happened (an error stays set across the call) */
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    r = PyObject_CallNoArgs(c->release);
    if (r == NULL) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return NULL;
    }
    Py_DECREF(r);
    PyErr_Restore(et, ev, tb);
    if (ok < 0)
        return NULL;
    return PyBool_FromLong(ok);
slow:
    return PyObject_Vectorcall(d->fallback, args, nargsf, kwnames);
}

static int
decider_traverse(Decider *d, visitproc visit, void *arg)
{
    Py_VISIT(d->fallback);
    Py_VISIT(d->clock);
    Py_VISIT(d->shards);
    Py_VISIT(d->consume);
    Py_VISIT(d->set_key);
    for (Py_ssize_t i = 0; d->cache != NULL && i < d->nshards; i++) {
        Py_VISIT(d->cache[i].acquire);
        Py_VISIT(d->cache[i].release);
    }
    return 0;
}

static int
decider_clear(Decider *d)
{
    Py_CLEAR(d->fallback);
    Py_CLEAR(d->clock);
    Py_CLEAR(d->consume);
    Py_CLEAR(d->set_key);
    if (d->cache != NULL) {
        for (Py_ssize_t i = 0; i < d->nshards; i++) {
            cache_release_index(&d->cache[i]);
            cache_release_cells(&d->cache[i]);
            Py_CLEAR(d->cache[i].acquire);
            Py_CLEAR(d->cache[i].release);
        }
        PyMem_Free(d->cache);
        d->cache = NULL;
    }
    Py_CLEAR(d->shards);
    return 0;
}

static void
decider_dealloc(Decider *d)
{
    PyObject_GC_UnTrack(d);
    decider_clear(d);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static int
decider_init(Decider *d, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {
        "fallback", "clock", "shards", "shard_mask", "shift", "width", "kind", "consume",
        "set_key", "max_id", "max_age", "max_skew", "window", "capacity", "flimit", "interval",
        "tolerance", "rate", "log_scale", "log_wait", "log_unit", "log_offset", "log_max_tick",
        "log_exact_base", "log_last", "expiry", "tokens", "admitted", "rejected", NULL};
    PyObject *fallback, *clock, *shards, *consume, *set_key;
    unsigned long long shard_mask;
    int shift, kind;
    Py_ssize_t width, max_id, log_exact_base, log_last, expiry, tokens, admitted, rejected;
    double max_age, max_skew, window, capacity, flimit, interval, tolerance, rate;
    double log_scale, log_wait, log_unit, log_offset, log_max_tick;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "OOO!KiniOOndddddddddddddnnnnnn", kwlist, &fallback, &clock, &PyList_Type,
            &shards, &shard_mask, &shift, &width, &kind, &consume, &set_key, &max_id, &max_age,
            &max_skew, &window, &capacity, &flimit, &interval, &tolerance, &rate, &log_scale,
            &log_wait, &log_unit, &log_offset, &log_max_tick, &log_exact_base, &log_last, &expiry,
            &tokens, &admitted, &rejected))
        return -1;
    if (d->cache != NULL) {
        PyErr_SetString(PyExc_TypeError, "Decider is initialised once");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(shards);
    if (kind < K_LOG || kind > K_SLIDING || width < 1 || n < 1 || (uint64_t)n != shard_mask + 1 ||
        shift < 0 || shift > 62 || max_id < 1) {
        PyErr_SetString(PyExc_ValueError, "Decider: bad arguments");
        return -1;
    }
    if (kind == K_LEASE && (expiry >= width || tokens >= width || admitted >= width ||
                            rejected >= width || expiry < 0 || tokens < 0 || admitted < 0 ||
                            rejected < 0)) {
        PyErr_SetString(PyExc_ValueError, "Decider: lease cells outside the row");
        return -1;
    }
    if (kind == K_LOG && (log_last < 0 || log_last + 3 > width)) {
        PyErr_SetString(PyExc_ValueError, "Decider: log cells outside the row");
        return -1;
    }
    ShardCache *cache = PyMem_Calloc((size_t)n, sizeof(ShardCache));
    if (cache == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    d->cache = cache;
    d->nshards = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *lock = PyObject_GetAttr(PyList_GET_ITEM(shards, i), s_lock);
        if (lock == NULL)
            return -1;
        cache[i].acquire = PyObject_GetAttr(lock, s_acquire);
        cache[i].release = PyObject_GetAttr(lock, s_release);
        Py_DECREF(lock);
        if (cache[i].acquire == NULL || cache[i].release == NULL)
            return -1;
    }
    d->fallback = Py_NewRef(fallback);
    d->clock = Py_NewRef(clock);
    d->shards = Py_NewRef(shards);
    d->consume = Py_NewRef(consume);
    d->set_key = Py_NewRef(set_key);
    d->shard_mask = shard_mask;
    d->shift = shift;
    d->kind = kind;
    d->width = width;
    d->max_id = max_id;
    d->max_age = max_age;
    d->max_skew = max_skew;
    d->window = window;
    d->capacity = capacity;
    d->flimit = flimit;
    d->interval = interval;
    d->tolerance = tolerance;
    d->rate = rate;
    d->log_scale = log_scale;
    d->log_wait = log_wait;
    d->log_unit = log_unit;
    d->log_offset = log_offset;
    d->log_max_tick = log_max_tick;
    d->log_last = log_last;
    d->log_exact_base = log_exact_base;
    d->expiry = expiry;
    d->tokens = tokens;
    d->admitted = admitted;
    d->rejected = rejected;
    d->vectorcall = decider_vectorcall;
    return 0;
}

static PyObject *
decider_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Decider *d = (Decider *)type->tp_alloc(type, 0);
    if (d != NULL)
        d->vectorcall = NULL;
    return (PyObject *)d;
}

static PyObject *
decider_call(PyObject *self, PyObject *args, PyObject *kwds)
{
    if (((Decider *)self)->vectorcall == NULL) {
        PyErr_SetString(PyExc_TypeError, "Decider is not initialised");
        return NULL;
    }
    return PyVectorcall_Call(self, args, kwds);
}

static PyTypeObject DeciderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "limiter._requestpath.Decider",
    .tp_basicsize = sizeof(Decider),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "allow_request(client_id, request) -> bool, compiled (see limiter/compiled.py).",
    .tp_new = decider_new,
    .tp_init = (initproc)decider_init,
    .tp_dealloc = (destructor)decider_dealloc,
    .tp_traverse = (traverseproc)decider_traverse,
    .tp_clear = (inquiry)decider_clear,
    .tp_call = decider_call,
    .tp_vectorcall_offset = offsetof(Decider, vectorcall),
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "limiter._requestpath",
    .m_doc = "The compiled request path of RateLimiter.allow_request.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__requestpath(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {{&s_timestamp, "timestamp"}, {&s_kv, "kv"},     {&s_rv, "rv"},
                 {&s_v0, "v0"},               {&s_mask, "mask"}, {&s_insert, "insert"},
                 {&s_lock, "lock"},           {&s_acquire, "acquire"},
                 {&s_release, "release"}};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return NULL;
    }
    if (PyType_Ready(&DeciderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Decider", (PyObject *)&DeciderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
