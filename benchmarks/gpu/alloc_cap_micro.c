/* Driver-call costs for bench_alloc_cap.py: reaches the driver like XLA (dlopen + dlsym). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <time.h>
typedef int (*fn)();
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
int main(void) {
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    fn init = (fn)dlsym(cuda, "cuInit"), get = (fn)dlsym(cuda, "cuDeviceGet");
    fn retain = (fn)dlsym(cuda, "cuDevicePrimaryCtxRetain"), set = (fn)dlsym(cuda, "cuCtxSetCurrent");
    fn alloc = (fn)dlsym(cuda, "cuMemAlloc_v2"), release = (fn)dlsym(cuda, "cuMemFree_v2");
    fn alloc_async = (fn)dlsym(cuda, "cuMemAllocAsync"), free_async = (fn)dlsym(cuda, "cuMemFreeAsync");
    fn sync = (fn)dlsym(cuda, "cuStreamSynchronize");
    int dev; void *ctx; unsigned long long p;
    if (init(0) || get(&dev, 0) || retain(&ctx, dev) || set(ctx)) { printf("{\"error\": \"no GPU\"}\n"); return 1; }
    size_t sizes[2] = {4096, 2u << 20};
    double per[2];
    for (int s = 0; s < 2; s++) {
        for (int i = 0; i < 200; i++) { alloc(&p, sizes[s]); release(p); }
        int n = 5000;
        double t0 = now();
        for (int i = 0; i < n; i++) { alloc(&p, sizes[s]); release(p); }
        per[s] = (now() - t0) / n;
    }
    int n = 20000;
    for (int i = 0; i < 200; i++) { alloc_async(&p, (size_t)(2u << 20), (void *)0); free_async(p, (void *)0); }
    sync((void *)0);
    double t0 = now();
    for (int i = 0; i < n; i++) { alloc_async(&p, (size_t)(2u << 20), (void *)0); free_async(p, (void *)0); }
    sync((void *)0);
    double async_pair = (now() - t0) / n;
    t0 = now();
    for (int i = 0; i < n; i++) { volatile void *q = dlsym(cuda, "cuMemAlloc_v2"); (void)q; }
    double dlsym_cu = (now() - t0) / n;
    t0 = now();
    for (int i = 0; i < n; i++) { volatile void *q = dlsym(cuda, "cuStreamSynchronize"); (void)q; }
    double dlsym_other = (now() - t0) / n;
    printf("{\"alloc_free_4k_ns\": %.0f, \"alloc_free_2m_ns\": %.0f, \"async_pair_2m_ns\": %.0f, "
           "\"dlsym_cu_name_ns\": %.1f, \"dlsym_other_ns\": %.1f}\n",
           per[0], per[1], async_pair, dlsym_cu, dlsym_other);
    return 0;
}
