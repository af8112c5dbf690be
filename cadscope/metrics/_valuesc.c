/* A task's outcome count and run time written in one call: cadscope.metrics._values.add for the
 * counter's value, the histogram's sum and its bucket, in C.
 *
 * Every task run writes these three values (cadscope.metrics._catalogue's task_finished). In
 * Python that is a bisect over the buckets' bounds, a tuple of changes, add()'s frame, the
 * lock's __enter__ and __exit__ and a struct call a value; on a busy host every line of that
 * code and data is read from memory again for each task (bench/RESULTS.md, "A task's metrics,
 * compiled"). observe() does the same writes and leaves the same state: each value's _value,
 * its _timestamp at 0.0, and the value and timestamp in the file at the value's _position.
 *
 * The lock. add() holds the class's lock, so that a read-modify-write on another thread is
 * never interleaved with its own. observe() runs with the GIL held and neither calls Python
 * code nor releases the GIL, so no other thread runs while it does: where the lock is free, no
 * thread is inside a write, and none can start one before observe() returns. Where the lock is
 * held (another thread was switched out inside add(), inc() or set()), or the values' files are
 * not this process's yet (after a fork), observe() writes nothing and returns False, and the
 * caller takes add(), which waits for the lock and follows the fork. Without a GIL (a
 * free-threaded build) it always returns False.
 *
 * Every object is fetched and checked before the first write: a value whose state is not what
 * add() leaves (not a float, a position outside its map) makes observe() return False having
 * written nothing, so add() can do the whole write, or raise as it would have.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *module_globals = NULL; /* cadscope.metrics._values's: its _pid, moved by every fork */
static PyObject *s_lock, *s_locked, *s_files_pid, *s_pid, *s_value, *s_timestamp, *s_file, *s_m, *s_position;
static PyObject *zero = NULL; /* 0.0, every value's timestamp after add() */

typedef struct {
    PyObject *value;
    double amount;
    Py_buffer view;
    int held;
    Py_ssize_t position;
    double total;
} Write;

/* 1: the value's map and position fetched into w (its buffer held) and its new total made; 0: not as add()
 * leaves it; -1: an error (cleared by the caller). */
static int prepare(Write *w) {
    PyObject *current = NULL, *file = NULL, *map = NULL, *position = NULL;
    int done = 0;
    if ((current = PyObject_GetAttr(w->value, s_value)) == NULL) goto out;
    if (!PyFloat_CheckExact(current)) goto out;
    if ((position = PyObject_GetAttr(w->value, s_position)) == NULL || !PyLong_CheckExact(position)) goto out;
    w->position = PyLong_AsSsize_t(position);
    if (w->position < 0) goto out;
    if ((file = PyObject_GetAttr(w->value, s_file)) == NULL || (map = PyObject_GetAttr(file, s_m)) == NULL) goto out;
    if (PyObject_GetBuffer(map, &w->view, PyBUF_WRITABLE) < 0) goto out;
    w->held = 1;
    if (w->position > w->view.len - 16) goto out;
    w->total = PyFloat_AS_DOUBLE(current) + w->amount;
    done = 1;
out:
    if (PyErr_Occurred()) {
        PyErr_Clear();
        done = 0;
    }
    Py_XDECREF(current);
    Py_XDECREF(position);
    Py_XDECREF(file);
    Py_XDECREF(map);
    return done;
}

/* 1: the lock is free and the class's files are this process's; 0 otherwise. */
static int may_write(PyObject *cls) {
    int free = 0;
    PyObject *lock = NULL, *locked = NULL, *files_pid = NULL;
    PyObject *pid = PyDict_GetItemWithError(module_globals, s_pid); /* borrowed */
    if (pid == NULL) goto out;
    if ((files_pid = PyObject_GetAttr(cls, s_files_pid)) == NULL) goto out;
    int same = PyObject_RichCompareBool(files_pid, pid, Py_EQ);
    if (same != 1) goto out;
    if ((lock = PyObject_GetAttr(cls, s_lock)) == NULL) goto out;
    if ((locked = PyObject_CallMethodNoArgs(lock, s_locked)) == NULL) goto out;
    free = locked == Py_False;
out:
    if (PyErr_Occurred()) {
        PyErr_Clear();
        free = 0;
    }
    Py_XDECREF(files_pid);
    Py_XDECREF(lock);
    Py_XDECREF(locked);
    return free;
}

/* observe(state, seconds) -> bool; state: (value class, counter value, sum value, bounds, buckets), bounds
 * the buckets' upper bounds as native doubles (bytes), ascending, the last infinite. */
static PyObject *observe(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
#ifdef Py_GIL_DISABLED
    (void)args;
    (void)nargs;
    Py_RETURN_FALSE;
#else
    if (nargs != 2 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != 5) {
        PyErr_SetString(PyExc_TypeError, "observe((cls, counter, sum, bounds, buckets), seconds)");
        return NULL;
    }
    PyObject *state = args[0], *seconds = args[1];
    PyObject *cls = PyTuple_GET_ITEM(state, 0), *bounds = PyTuple_GET_ITEM(state, 3),
             *buckets = PyTuple_GET_ITEM(state, 4);
    if (module_globals == NULL || !PyFloat_CheckExact(seconds) || !PyBytes_CheckExact(bounds) ||
        !PyTuple_CheckExact(buckets))
        Py_RETURN_FALSE;
    double observed = PyFloat_AS_DOUBLE(seconds);
    Py_ssize_t count = PyBytes_GET_SIZE(bounds) / (Py_ssize_t)sizeof(double);
    if (observed != observed || count != PyTuple_GET_SIZE(buckets) || count == 0) Py_RETURN_FALSE; /* NaN */
    /* bisect_left: the first bound >= observed, as Histogram.observe() picks its bucket */
    const char *raw = PyBytes_AS_STRING(bounds);
    Py_ssize_t low = 0, high = count;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        double bound;
        memcpy(&bound, raw + middle * sizeof(double), sizeof(double));
        if (bound < observed)
            low = middle + 1;
        else
            high = middle;
    }
    if (low == count || !may_write(cls)) Py_RETURN_FALSE;
    Write writes[3] = {
        {PyTuple_GET_ITEM(state, 1), 1.0, {0}, 0, 0, 0.0},
        {PyTuple_GET_ITEM(state, 2), observed, {0}, 0, 0, 0.0},
        {PyTuple_GET_ITEM(buckets, low), 1.0, {0}, 0, 0, 0.0},
    };
    int ready = 1;
    for (int i = 0; i < 3 && ready; i++) ready = prepare(&writes[i]);
    PyObject *result = Py_False, *totals[3] = {NULL, NULL, NULL};
    for (int i = 0; i < 3 && ready; i++) { /* made before the first write: add() does all or none */
        if ((totals[i] = PyFloat_FromDouble(writes[i].total)) == NULL) {
            PyErr_Clear();
            ready = 0;
        }
    }
    if (ready) {
        for (int i = 0; i < 3; i++) {
            /* the instance's own attributes, as add() sets them: no Python code runs */
            if (PyObject_SetAttr(writes[i].value, s_value, totals[i]) < 0 ||
                PyObject_SetAttr(writes[i].value, s_timestamp, zero) < 0) {
                result = NULL; /* cannot happen to a value add() can write; if it does, the caller sees why */
                break;
            }
            double pair[2] = {writes[i].total, 0.0}; /* struct "dd": native order, as _PAIR_INTO */
            memcpy((char *)writes[i].view.buf + writes[i].position, pair, sizeof pair);
        }
        if (result != NULL) result = Py_True;
    }
    for (int i = 0; i < 3; i++) Py_XDECREF(totals[i]);
    for (int i = 0; i < 3; i++)
        if (writes[i].held) PyBuffer_Release(&writes[i].view);
    return Py_XNewRef(result);
#endif
}

static PyObject *configure(PyObject *module, PyObject *globals) {
    (void)module;
    if (!PyDict_Check(globals)) {
        PyErr_SetString(PyExc_TypeError, "configure(the _values module's globals)");
        return NULL;
    }
    Py_INCREF(globals);
    Py_XSETREF(module_globals, globals);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"observe", (PyCFunction)(void (*)(void))observe, METH_FASTCALL,
     "observe(state, seconds) -> bool\n\n"
     "Add 1 to the counter value, seconds to the sum value and 1 to the bucket value for seconds, as "
     "_values.add does; False, having written nothing, where add() must (the lock held, a fork not yet "
     "followed, anything unexpected)."},
    {"configure", configure, METH_O, "configure(globals): the _values module's globals, for its _pid."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_valuesc", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__valuesc(void) {
    PyObject **interned[] = {&s_lock, &s_locked, &s_files_pid, &s_pid, &s_value,
                             &s_timestamp, &s_file, &s_m, &s_position};
    const char *texts[] = {"_lock", "locked", "_files_pid", "_pid", "_value", "_timestamp", "_file", "m", "_position"};
    for (int i = 0; i < 9; i++) {
        if ((*interned[i] = PyUnicode_InternFromString(texts[i])) == NULL) return NULL;
    }
    if ((zero = PyFloat_FromDouble(0.0)) == NULL) return NULL;
    return PyModule_Create(&module_def);
}
