/* What a worker's export thread does for each task span, compiled: its OTLP encoding
 * (cadscope.tracing._otlpwire's _lean_span) and the reading of its sampled traceparent
 * (cadscope.tracing._lean's _sampled_w3c_child), in C.
 *
 * A worker's export thread encodes every task span it exports. In Python that
 * is 5-6 us a span in a batch of 512, 0.8 here (bench/span_cost.py); on a busy
 * host the export thread's work was a quarter of what cadscope added to a no-op
 * task (bench/RESULTS.md, "The export thread's work, compiled"). This writes
 * the same bytes from the same fields.
 *
 * It takes only the common shape and gives None for anything else, which the
 * Python encoder then writes (and logs, where it drops an attribute): a
 * resolved LeanSpan with a plain dict of str keys and str, bool, int (within
 * int64) or float values, no events, no links, an empty trace state and the
 * UNSET status, every string valid UTF-8. What "LeanSpan", "UNSET", "the
 * empty trace state" and each SpanKind's number are is handed over once by
 * configure(); cadscope.tracing._compiled checks first that a SpanContext is still the tuple
 * (trace_id, span_id, is_remote, trace_flags, trace_state, ...) it reads.
 *
 * Nothing in the encoding calls back into Python code but TraceState's __len__
 * (for a trace state other than the empty default), and nothing releases the GIL.
 *
 * sampled_w3c_child() makes the span context and parent that a deferred task
 * span gets from a valid, sampled traceparent of version 00's form, where
 * _lean has found the propagator and sampler to be the defaults: in Python,
 * through a regular expression, three int() parses and two SpanContext.__new__
 * calls, ~4 us a span on the export thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *lean_span_type = NULL; /* cadscope.tracing._lean.LeanSpan */
static PyObject *unset_status = NULL;   /* LeanSpan's class default: Status(StatusCode.UNSET) */
static PyObject *empty_state = NULL;    /* the API's DEFAULT_TRACE_STATE, what a SpanContext gets for None */
static PyObject *kinds = NULL;          /* {SpanKind: OTLP's number} */
static PyObject *span_context_type = NULL; /* opentelemetry.trace.SpanContext */
static PyObject *trace_flags = NULL;       /* (TraceFlags(0), ..., TraceFlags(255)) */
static long random_flag = 0;               /* TraceFlags.RANDOM_TRACE_ID, or 0 */

static PyObject *s_context, *s_parent, *s_name, *s_kind, *s_start_time, *s_end_time, *s_attributes, *s_status,
    *s_events, *s_links;

typedef struct {
    unsigned char *data;
    Py_ssize_t len, cap;
    unsigned char local[1024];
} Buffer;

static int reserve(Buffer *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + more) cap *= 2;
    unsigned char *data;
    if (b->data == b->local) {
        data = PyMem_Malloc(cap);
        if (data != NULL) memcpy(data, b->local, b->len);
    } else {
        data = PyMem_Realloc(b->data, cap);
    }
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static void release(Buffer *b) {
    if (b->data != b->local) PyMem_Free(b->data);
}

static int varint_size(uint64_t n) {
    int size = 1;
    while (n >= 128) {
        n >>= 7;
        size++;
    }
    return size;
}

static unsigned char *put_varint(unsigned char *p, uint64_t n) {
    while (n >= 128) {
        *p++ = (unsigned char)((n & 127) | 128);
        n >>= 7;
    }
    *p++ = (unsigned char)n;
    return p;
}

static int add_bytes(Buffer *b, const void *bytes, Py_ssize_t n) {
    if (reserve(b, n) < 0) return -1;
    memcpy(b->data + b->len, bytes, n);
    b->len += n;
    return 0;
}

/* A length-delimited field: tag, length, payload. */
static int add_field(Buffer *b, unsigned char tag, const char *payload, Py_ssize_t n) {
    if (reserve(b, 11 + n) < 0) return -1;
    unsigned char *p = b->data + b->len;
    *p++ = tag;
    p = put_varint(p, (uint64_t)n);
    memcpy(p, payload, n);
    b->len = (p + n) - b->data;
    return 0;
}

static int add_fixed64(Buffer *b, unsigned char tag, uint64_t n) {
    if (reserve(b, 9) < 0) return -1;
    unsigned char *p = b->data + b->len;
    *p++ = tag;
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(n >> (8 * i)); /* little-endian */
    b->len += 9;
    return 0;
}

/* A str's UTF-8, strictly; NULL (and no error set) if it has lone surrogates or is not exactly a str. */
static const char *utf8(PyObject *text, Py_ssize_t *size) {
    if (!PyUnicode_CheckExact(text)) return NULL;
    const char *bytes = PyUnicode_AsUTF8AndSize(text, size);
    if (bytes == NULL) PyErr_Clear();
    return bytes;
}

/* An int's 64-bit two's complement; 0 if it fits in int64, else -1 (no error set). */
static int as_int64(PyObject *value, uint64_t *out) {
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow != 0 || (n == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    *out = (uint64_t)n;
    return 0;
}

/* An attribute: the KeyValue message in a field of the span's. 1 written, 0 not this shape, -1 error. */
static int add_attribute(Buffer *b, PyObject *key, PyObject *value) {
    Py_ssize_t key_size, text_size = 0;
    const char *key_bytes = utf8(key, &key_size), *text = NULL;
    unsigned char scalar[10];
    int scalar_size = 0;
    unsigned char value_tag;
    if (key_bytes == NULL) return 0;
    if (PyUnicode_CheckExact(value)) {
        if ((text = utf8(value, &text_size)) == NULL) return 0;
        value_tag = 0x0a;
    } else if (PyBool_Check(value)) {
        value_tag = 0x10;
        scalar[0] = value == Py_True;
        scalar_size = 1;
    } else if (PyLong_CheckExact(value)) {
        uint64_t n;
        if (as_int64(value, &n) < 0) return 0;
        value_tag = 0x18;
        scalar_size = (int)(put_varint(scalar, n) - scalar);
    } else if (PyFloat_CheckExact(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        value_tag = 0x21;
        for (int i = 0; i < 8; i++) scalar[i] = (unsigned char)(bits >> (8 * i));
        scalar_size = 8;
    } else {
        return 0;
    }
    /* AnyValue: one member of its oneof, zero values included. */
    Py_ssize_t any_size = value_tag == 0x0a ? 1 + varint_size((uint64_t)text_size) + text_size : 1 + scalar_size;
    Py_ssize_t pair_size = 1 + varint_size((uint64_t)any_size) + any_size;
    if (key_size > 0) pair_size += 1 + varint_size((uint64_t)key_size) + key_size;
    if (reserve(b, 1 + 10 + pair_size) < 0) return -1;
    unsigned char *p = b->data + b->len;
    *p++ = 0x4a;
    p = put_varint(p, (uint64_t)pair_size);
    if (key_size > 0) {
        *p++ = 0x0a;
        p = put_varint(p, (uint64_t)key_size);
        memcpy(p, key_bytes, key_size);
        p += key_size;
    }
    *p++ = 0x12;
    p = put_varint(p, (uint64_t)any_size);
    *p++ = value_tag;
    if (value_tag == 0x0a) {
        p = put_varint(p, (uint64_t)text_size);
        memcpy(p, text, text_size);
        p += text_size;
    } else {
        memcpy(p, scalar, scalar_size);
        p += scalar_size;
    }
    b->len = p - b->data;
    return 1;
}

/* A trace or span id, big-endian, as int.to_bytes(size, "big"); -1 if it does not fit (no error set). */
static int put_id(unsigned char *out, PyObject *id, Py_ssize_t size) {
    if (!PyLong_CheckExact(id)) return -1;
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t n = PyLong_AsNativeBytes(
        id, out, size,
        Py_ASNATIVEBYTES_BIG_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (n < 0) {
        PyErr_Clear();
        return -1;
    }
    return n <= size ? 0 : -1;
#else
    if (_PyLong_AsByteArray((PyLongObject *)id, out, (size_t)size, 0, 0) < 0) {
        PyErr_Clear();
        return -1;
    }
    return 0;
#endif
}

/* 1: the span's context, a SpanContext read as the tuple it is; 0: not that shape. */
static int context_fields(PyObject *context, PyObject **trace_id, PyObject **span_id, PyObject **remote,
                          PyObject **state) {
    if (!PyTuple_Check(context) || PyTuple_GET_SIZE(context) < 5) return 0;
    *trace_id = PyTuple_GET_ITEM(context, 0);
    *span_id = PyTuple_GET_ITEM(context, 1);
    *remote = PyTuple_GET_ITEM(context, 2);
    *state = PyTuple_GET_ITEM(context, 4);
    return 1;
}

/* 1: no trace state to send; 0: one to send (the Python encoder's), -1 error. */
static int state_is_empty(PyObject *state) {
    if (state == empty_state || state == Py_None) return 1;
    Py_ssize_t n = PyObject_Length(state);
    if (n < 0) return -1;
    return n == 0;
}

/* The span's fields, in order, into b: 1 written, 0 not the shape this handles, -1 error. */
static int encode(Buffer *b, PyObject **fields) {
    PyObject *context = fields[0], *parent = fields[1], *name = fields[2], *kind = fields[3],
             *start = fields[4], *end = fields[5], *attributes = fields[6], *status = fields[7],
             *events = fields[8], *links = fields[9];
    PyObject *trace_id, *span_id, *remote, *state, *parent_trace_id, *parent_id = NULL, *parent_remote = NULL,
                                                                     *parent_state;
    unsigned char ids[2 + 16 + 2 + 8];
    int empty;

    if (context == Py_None || status != unset_status || !PyDict_CheckExact(attributes)) return 0;
    if (!(PyTuple_CheckExact(events) && PyTuple_GET_SIZE(events) == 0)) return 0;
    if (!(PyTuple_CheckExact(links) && PyTuple_GET_SIZE(links) == 0)) return 0;
    if (!context_fields(context, &trace_id, &span_id, &remote, &state)) return 0;
    if ((empty = state_is_empty(state)) <= 0) return empty;
    if (parent != Py_None && !context_fields(parent, &parent_trace_id, &parent_id, &parent_remote, &parent_state))
        return 0;
    ids[0] = 0x0a;
    ids[1] = 0x10;
    ids[18] = 0x12;
    ids[19] = 0x08;
    if (put_id(ids + 2, trace_id, 16) < 0 || put_id(ids + 20, span_id, 8) < 0) return 0;
    if (add_bytes(b, ids, sizeof ids) < 0) return -1;
    if (parent_id != NULL) {
        unsigned char field[10] = {0x22, 0x08};
        if (put_id(field + 2, parent_id, 8) < 0) return 0;
        if (add_bytes(b, field, sizeof field) < 0) return -1;
    }
    Py_ssize_t name_size;
    const char *name_bytes = utf8(name, &name_size);
    if (name_bytes == NULL) return 0;
    if (name_size > 0 && add_field(b, 0x2a, name_bytes, name_size) < 0) return -1;
    /* The kind by identity (SpanKind's members are singletons): a dict lookup would call Enum.__hash__. */
    long number = -1;
    PyObject *known, *otlp;
    Py_ssize_t at = 0;
    while (PyDict_Next(kinds, &at, &known, &otlp)) {
        if (known == kind) {
            number = PyLong_AsLong(otlp);
            break;
        }
    }
    if (number < 0 || number > 127) {
        PyErr_Clear();
        return 0;
    }
    unsigned char kind_field[2] = {0x30, (unsigned char)number};
    if (add_bytes(b, kind_field, 2) < 0) return -1;
    uint64_t time;
    if (start != Py_None) {
        if (!PyLong_CheckExact(start) || as_int64(start, &time) < 0 || (int64_t)time < 0) return 0;
        if (time != 0 && add_fixed64(b, 0x39, time) < 0) return -1;
    }
    if (end != Py_None) {
        if (!PyLong_CheckExact(end) || as_int64(end, &time) < 0 || (int64_t)time < 0) return 0;
        if (time != 0 && add_fixed64(b, 0x41, time) < 0) return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(attributes, &pos, &key, &value)) {
        int done = add_attribute(b, key, value);
        if (done <= 0) return done;
    }
    /* The UNSET status, sent even when empty; then the flags: the parent's remoteness known, and its value. */
    uint32_t flags = 0x100;
    if (parent_remote != NULL) {
        int is_remote = PyObject_IsTrue(parent_remote);
        if (is_remote < 0) return -1;
        if (is_remote) flags |= 0x200;
    }
    unsigned char tail[2 + 2 + 4] = {0x7a, 0x00, 0x85, 0x01};
    for (int i = 0; i < 4; i++) tail[4 + i] = (unsigned char)(flags >> (8 * i));
    return add_bytes(b, tail, sizeof tail) < 0 ? -1 : 1;
}

static PyObject *lean_span_field(PyObject *module, PyObject *span) {
    (void)module;
    if (lean_span_type == NULL || (PyObject *)Py_TYPE(span) != lean_span_type) Py_RETURN_NONE;
    PyObject *names[10] = {s_context, s_parent, s_name, s_kind, s_start_time,
                           s_end_time, s_attributes, s_status, s_events, s_links};
    PyObject *fields[10] = {NULL};
    PyObject *result = NULL;
    Buffer b;
    b.data = b.local;
    b.len = 0;
    b.cap = sizeof b.local;
    int done = -1;
    for (int i = 0; i < 10; i++) {
        if ((fields[i] = PyObject_GetAttr(span, names[i])) == NULL) goto out;
    }
    /* the Span message, as field 2 of its ScopeSpans: room in front for the tag and a length of 2 bytes */
    b.len = 3;
    done = encode(&b, fields);
    if (done == 1) {
        uint64_t n = (uint64_t)(b.len - 3);
        int size = varint_size(n);
        unsigned char *head = b.data + 3 - 1 - size;
        if (size > 2) { /* a span of 16 KiB or more: the field's head written in front */
            result = PyBytes_FromStringAndSize(NULL, 1 + size + (Py_ssize_t)n);
            if (result != NULL) {
                unsigned char *p = (unsigned char *)PyBytes_AS_STRING(result);
                *p++ = 0x12;
                p = put_varint(p, n);
                memcpy(p, b.data + 3, (size_t)n);
            }
        } else {
            head[0] = 0x12;
            put_varint(head + 1, n);
            result = PyBytes_FromStringAndSize((const char *)head, 1 + size + (Py_ssize_t)n);
        }
    } else if (done == 0) {
        result = Py_NewRef(Py_None);
    }
out:
    for (int i = 0; i < 10; i++) Py_XDECREF(fields[i]);
    release(&b);
    return result;
}

static PyObject *configure(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *span_type, *unset, *empty, *kind_numbers;
    if (!PyArg_ParseTuple(args, "OOOO!:configure", &span_type, &unset, &empty, &PyDict_Type, &kind_numbers))
        return NULL;
    Py_INCREF(span_type);
    Py_INCREF(unset);
    Py_INCREF(empty);
    Py_INCREF(kind_numbers);
    Py_XSETREF(lean_span_type, span_type);
    Py_XSETREF(unset_status, unset);
    Py_XSETREF(empty_state, empty);
    Py_XSETREF(kinds, kind_numbers);
    Py_RETURN_NONE;
}


static int hex_digit(Py_UCS1 c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1; /* upper case too: the W3C propagator's expression takes lower case only */
}

/* n hex digits at text into out (big-endian bytes, n even); -1 if one is not lower-case hex. */
static int parse_hex(const Py_UCS1 *text, int n, unsigned char *out) {
    for (int i = 0; i < n; i += 2) {
        int high = hex_digit(text[i]), low = hex_digit(text[i + 1]);
        if (high < 0 || low < 0) return -1;
        out[i / 2] = (unsigned char)(high << 4 | low);
    }
    return 0;
}

static int all_zero(const unsigned char *bytes, int n) {
    for (int i = 0; i < n; i++)
        if (bytes[i]) return 0;
    return 1;
}

static PyObject *from_big_endian(const unsigned char *bytes, Py_ssize_t n) {
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(bytes, (size_t)n, Py_ASNATIVEBYTES_BIG_ENDIAN);
#else
    return _PyLong_FromByteArray(bytes, (size_t)n, 0, 0);
#endif
}

/* SpanContext(trace_id, span_id, is_remote, flags, state) as its __new__ makes it: the tuple with is_valid
 * last. span_id from an id generator: where it is not an int, SpanContext itself is called. */
static PyObject *span_context(PyObject *trace_id, PyObject *span_id, PyObject *is_remote, PyObject *flags,
                              PyObject *state) {
    if (!PyLong_CheckExact(span_id))
        return PyObject_CallFunctionObjArgs(span_context_type, trace_id, span_id, is_remote, flags, state, NULL);
    int fits = 1;
    unsigned long long id = PyLong_AsUnsignedLongLong(span_id);
    if (id == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative, or past 64 bits */
        fits = 0;
    }
    PyObject *valid = fits && id != 0 ? Py_True : Py_False; /* the trace id is valid: checked */
    PyObject *items = PyTuple_Pack(6, trace_id, span_id, is_remote, flags, state, valid);
    if (items == NULL) return NULL;
    PyObject *args = PyTuple_Pack(1, items);
    Py_DECREF(items);
    if (args == NULL) return NULL;
    PyObject *made = PyTuple_Type.tp_new((PyTypeObject *)span_context_type, args, NULL); /* tuple.__new__ */
    Py_DECREF(args);
    return made;
}

static PyObject *sampled_w3c_child(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "sampled_w3c_child(traceparent, tracestate, parse_state, new_span_id)");
        return NULL;
    }
    PyObject *traceparent = args[0], *header = args[1], *parse_state = args[2], *new_span_id = args[3];
    if (span_context_type == NULL || !PyUnicode_CheckExact(traceparent) || PyUnicode_GET_LENGTH(traceparent) != 55 ||
        PyUnicode_KIND(traceparent) != PyUnicode_1BYTE_KIND)
        Py_RETURN_NONE;
    const Py_UCS1 *text = PyUnicode_1BYTE_DATA(traceparent);
    unsigned char version, trace[16], span[8], flags;
    /* [0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}, version not ff, ids not all zero, sampled */
    if (text[2] != '-' || text[35] != '-' || text[52] != '-' || parse_hex(text, 2, &version) < 0 ||
        parse_hex(text + 3, 32, trace) < 0 || parse_hex(text + 36, 16, span) < 0 ||
        parse_hex(text + 53, 2, &flags) < 0 || version == 0xff || all_zero(trace, 16) || all_zero(span, 8) ||
        !(flags & 1))
        Py_RETURN_NONE;
    PyObject *state = NULL, *trace_id = NULL, *parent_id = NULL, *child_id = NULL, *parent = NULL, *child = NULL,
             *result = NULL;
    if (header == Py_None) {
        state = Py_NewRef(empty_state);
    } else {
        state = PyObject_CallOneArg(parse_state, header);
        if (state == NULL) goto out;
        if (state == Py_None) Py_SETREF(state, Py_NewRef(empty_state));
    }
    if ((trace_id = from_big_endian(trace, 16)) == NULL || (parent_id = from_big_endian(span, 8)) == NULL) goto out;
    parent = span_context(trace_id, parent_id, Py_True, PyTuple_GET_ITEM(trace_flags, flags), state);
    if (parent == NULL || (child_id = PyObject_CallNoArgs(new_span_id)) == NULL) goto out;
    child = span_context(trace_id, child_id, Py_False, PyTuple_GET_ITEM(trace_flags, 1 | (flags & random_flag)), state);
    if (child == NULL) goto out;
    result = PyTuple_Pack(2, child, parent);
out:
    Py_XDECREF(state);
    Py_XDECREF(trace_id);
    Py_XDECREF(parent_id);
    Py_XDECREF(child_id);
    Py_XDECREF(parent);
    Py_XDECREF(child);
    return result;
}

static PyObject *configure_w3c(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *context_type, *flags_table, *empty;
    long random;
    if (!PyArg_ParseTuple(args, "OO!Ol:configure_w3c", &context_type, &PyTuple_Type, &flags_table, &empty, &random))
        return NULL;
    if (!PyType_Check(context_type) || !PyType_IsSubtype((PyTypeObject *)context_type, &PyTuple_Type) ||
        PyTuple_GET_SIZE(flags_table) != 256 || random < 0 || random > 255) {
        PyErr_SetString(PyExc_ValueError, "configure_w3c(SpanContext, 256 TraceFlags, empty state, random bit)");
        return NULL;
    }
    Py_INCREF(context_type);
    Py_INCREF(flags_table);
    Py_INCREF(empty);
    Py_XSETREF(span_context_type, context_type);
    Py_XSETREF(trace_flags, flags_table);
    Py_XSETREF(empty_state, empty); /* the same object configure() is given */
    random_flag = random;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lean_span_field", lean_span_field, METH_O,
     "lean_span_field(span) -> bytes | None\n\n"
     "The span's Span message as field 2 of a ScopeSpans (tag, length, message), or None where the span "
     "is not of the shape this encodes (the Python encoder's then)."},
    {"configure", configure, METH_VARARGS,
     "configure(lean_span_type, unset_status, empty_trace_state, kinds)\n\n"
     "What lean_span_field checks spans against; kinds maps each SpanKind to its OTLP number."},
    {"sampled_w3c_child", (PyCFunction)(void (*)(void))sampled_w3c_child, METH_FASTCALL,
     "sampled_w3c_child(traceparent, tracestate, parse_state, new_span_id) -> (child, parent) | None\n\n"
     "The span contexts of a new span and its remote parent read off a valid, sampled traceparent of "
     "version 00's form, or None for any other header. tracestate is the header or None; parse_state(header) "
     "gives its TraceState, new_span_id() the child's span id."},
    {"configure_w3c", configure_w3c, METH_VARARGS,
     "configure_w3c(span_context_type, trace_flags, empty_trace_state, random_flag)\n\n"
     "SpanContext, the 256 TraceFlags values by number, the API's empty trace state, the random-trace-id bit."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_wirec", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__wirec(void) {
    PyObject **interned[] = {&s_context, &s_parent, &s_name, &s_kind, &s_start_time,
                             &s_end_time, &s_attributes, &s_status, &s_events, &s_links};
    const char *texts[] = {"_context", "_parent", "_name", "_kind", "_start_time",
                           "_end_time", "_attributes", "_status", "_events", "_links"};
    for (int i = 0; i < 10; i++) {
        if ((*interned[i] = PyUnicode_InternFromString(texts[i])) == NULL) return NULL;
    }
    return PyModule_Create(&module_def);
}
