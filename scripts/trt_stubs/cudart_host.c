/* A host-memory stand-in for the CUDA runtime (libcudart), for checking edgetool's TensorRT glue against
 * the real TensorRT Python bindings on a machine without a GPU (scripts/tensorrt_bindings.sh builds it).
 * It computes nothing. "Device" memory is host memory, so copies really move bytes; every stream has a
 * virtual clock that only `edgetool_stub_work(stream, ms)` advances (a test's fake enqueue calls it), so
 * CUDA events measure exactly the work enqueued between them; a stream capture records that work into a
 * graph, and launching the graph replays it. Only the calls Polygraphy's CUDA wrapper and
 * toolchain/backends/cuda.py make are here. EDGETOOL_STUB_CUDA_DEVICES sets the device count (default 1). */
#include <stdlib.h>
#include <string.h>

typedef struct { double now_ms; int capturing; double captured_ms; } stream_t;
typedef struct { double at_ms; int recorded; } event_t;
typedef struct { double ms; } graph_t;

static stream_t default_stream;
static int last_error;

static stream_t *S(void *s) { return s ? (stream_t *)s : &default_stream; }
static int fail(int code) { last_error = code; return code; }

int cudaGetDeviceCount(int *count) {
    const char *env = getenv("EDGETOOL_STUB_CUDA_DEVICES");
    *count = env ? atoi(env) : 1;
    return *count > 0 ? 0 : fail(100); /* cudaErrorNoDevice */
}
int cudaDeviceGetAttribute(int *value, int attr, int device) {
    (void)device;
    *value = attr == 75 ? 8 : attr == 76 ? 7 : attr == 16 ? 8 : 0; /* compute 8.7, 8 SMs: an Orin Nano 8 GB */
    return 0;
}
static int props(char *p, int device) {
    (void)device;
    strcpy(p, "edgetool host-memory CUDA stand-in");
    return 0;
}
int cudaGetDeviceProperties(char *p, int device) { return props(p, device); }
int cudaGetDeviceProperties_v2(char *p, int device) { return props(p, device); }
const char *cudaGetErrorString(int status) { return status == 100 ? "no CUDA-capable device is detected" : "stand-in error"; }
int cudaGetLastError(void) { int e = last_error; last_error = 0; return e; }

int cudaMalloc(void **ptr, size_t nbytes) { *ptr = calloc(1, nbytes ? nbytes : 1); return *ptr ? 0 : fail(2); }
int cudaFree(void *ptr) { free(ptr); return 0; }
int cudaMemcpy(void *dst, const void *src, size_t nbytes, int kind) { (void)kind; memmove(dst, src, nbytes); return 0; }
int cudaMemcpyAsync(void *dst, const void *src, size_t nbytes, int kind, void *stream) {
    (void)kind; (void)stream; memmove(dst, src, nbytes); return 0;
}

int cudaStreamCreate(void **stream) { *stream = calloc(1, sizeof(stream_t)); return *stream ? 0 : fail(2); }
int cudaStreamDestroy(void *stream) { if (stream) free(stream); return 0; }
int cudaStreamSynchronize(void *stream) { return S(stream)->capturing ? fail(900) : 0; }

/* The work of one enqueue: `ms` of GPU time on the stream's clock (or into the graph being captured). */
void edgetool_stub_work(void *stream, double ms) {
    stream_t *s = S(stream);
    if (s->capturing) s->captured_ms += ms; else s->now_ms += ms;
}
double edgetool_stub_clock(void *stream) { return S(stream)->now_ms; }

int cudaEventCreate(void **ev) { *ev = calloc(1, sizeof(event_t)); return *ev ? 0 : fail(2); }
int cudaEventDestroy(void *ev) { free(ev); return 0; }
int cudaEventRecord(void *ev, void *stream) {
    event_t *e = ev;
    if (!e) return fail(400);
    e->at_ms = S(stream)->now_ms;
    e->recorded = 1;
    return 0;
}
int cudaEventSynchronize(void *ev) { return ev && ((event_t *)ev)->recorded ? 0 : fail(600); }
int cudaEventElapsedTime(float *ms, void *start, void *end) {
    event_t *a = start, *b = end;
    if (!a || !b || !a->recorded || !b->recorded) return fail(600);
    *ms = (float)(b->at_ms - a->at_ms);
    return 0;
}

int cudaStreamBeginCapture(void *stream, int mode) {
    (void)mode;
    stream_t *s = S(stream);
    if (s->capturing) return fail(900);
    s->capturing = 1;
    s->captured_ms = 0.0;
    return 0;
}
int cudaStreamEndCapture(void *stream, void **graph) {
    stream_t *s = S(stream);
    if (!s->capturing) return fail(900);
    s->capturing = 0;
    graph_t *g = calloc(1, sizeof(graph_t));
    if (!g) return fail(2);
    g->ms = s->captured_ms;
    *graph = g;
    return 0;
}
int cudaGraphDestroy(void *graph) { free(graph); return 0; }
int cudaGraphInstantiateWithFlags(void **exec, void *graph, unsigned long long flags) {
    (void)flags;
    graph_t *g = calloc(1, sizeof(graph_t));
    if (!g) return fail(2);
    *g = *(graph_t *)graph;
    *exec = g;
    return 0;
}
int cudaGraphLaunch(void *exec, void *stream) { S(stream)->now_ms += ((graph_t *)exec)->ms; return 0; }
int cudaGraphExecDestroy(void *exec) { free(exec); return 0; }
