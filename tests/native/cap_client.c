/*
 * A test program that allocates through the driver API, run under the cap.
 *
 * usage: cap_client MODE OP...
 *   MODE  direct    call the cu* symbols it is linked with (-lcuda)
 *         dlsym     dlopen("libcuda.so.1") + dlsym(handle, "cuMemAlloc_v2"), like XLA
 *         gpa       cuGetProcAddress_v2("cuMemAlloc", 12000, 0), like cudart
 *         gpa-ptsz  the same with the per-thread default stream flag (_ptsz variants)
 *   OP    one per argument, each printing one line "name value...":
 *         alloc:N fill:C async:N asyncfill:C freeasync trim pool:N poolfill:C pooldestroy
 *         vmm:N vmmfill:C vmmhost:N vmmrelease vmmunmap pitch:W:H managed:N
 *         array:W:H array3d:W:H:D mipmap:W:H:L arraydestroy freeall freeunknown
 *         info devtotal used wait hold device:K vmmon:K:N
 * "device:K" makes ordinal K's primary context current (later ops land there);
 * "vmmon:K:N" maps N bytes of VMM memory located on ordinal K, whatever is current.
 * "fill:C" allocates C bytes at a time until refused and prints the total and the
 * error code; "wait" reads one line from stdin; "hold" waits for EOF on stdin.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long u64;

CUresult cuMemAlloc_v2(u64 *, size_t);
CUresult cuMemFree_v2(u64);
CUresult cuMemAllocAsync(u64 *, size_t, void *);
CUresult cuMemAllocAsync_ptsz(u64 *, size_t, void *);
CUresult cuMemFreeAsync(u64, void *);
CUresult cuMemFreeAsync_ptsz(u64, void *);
CUresult cuMemAllocFromPoolAsync(u64 *, size_t, void *, void *);
CUresult cuMemAllocFromPoolAsync_ptsz(u64 *, size_t, void *, void *);
CUresult cuMemPoolCreate(void **, const void *);
CUresult cuMemPoolDestroy(void *);
CUresult cuMemPoolTrimTo(void *, size_t);
CUresult cuDeviceGetMemPool(void **, int);
CUresult cuMemCreate(u64 *, size_t, const int *, u64);
CUresult cuMemRelease(u64);
CUresult cuMemMap(u64, size_t, size_t, u64, u64);
CUresult cuMemUnmap(u64, size_t);
CUresult cuMemAddressReserve(u64 *, size_t, size_t, u64, u64);
CUresult cuMemAllocPitch_v2(u64 *, size_t *, size_t, size_t, unsigned);
CUresult cuMemAllocManaged(u64 *, size_t, unsigned);
CUresult cuArrayCreate_v2(void **, const void *);
CUresult cuArray3DCreate_v2(void **, const void *);
CUresult cuMipmappedArrayCreate(void **, const void *, unsigned);
CUresult cuArrayDestroy(void *);
CUresult cuMipmappedArrayDestroy(void *);
CUresult cuMemGetInfo_v2(size_t *, size_t *);
CUresult cuDeviceTotalMem_v2(size_t *, int);
CUresult cuGetProcAddress_v2(const char *, void **, int, u64, int *);
u64 fake_device_used(void);
CUresult cuDevicePrimaryCtxRetain(void **, int);
CUresult cuCtxSetCurrent(void *);

static struct {
    CUresult (*alloc)(u64 *, size_t);
    CUresult (*free_)(u64);
    CUresult (*alloc_async)(u64 *, size_t, void *);
    CUresult (*free_async)(u64, void *);
    CUresult (*alloc_pool)(u64 *, size_t, void *, void *);
    CUresult (*pool_create)(void **, const void *);
    CUresult (*pool_destroy)(void *);
    CUresult (*trim)(void *, size_t);
    CUresult (*create)(u64 *, size_t, const int *, u64);
    CUresult (*release)(u64);
    CUresult (*map)(u64, size_t, size_t, u64, u64);
    CUresult (*unmap)(u64, size_t);
    CUresult (*pitch)(u64 *, size_t *, size_t, size_t, unsigned);
    CUresult (*managed)(u64 *, size_t, unsigned);
    CUresult (*array)(void **, const void *);
    CUresult (*array3d)(void **, const void *);
    CUresult (*mipmap)(void **, const void *, unsigned);
    CUresult (*array_destroy)(void *);
    CUresult (*mipmap_destroy)(void *);
    CUresult (*info)(size_t *, size_t *);
    CUresult (*devtotal)(size_t *, int);
} cu;

#define DIRECT(field, fn) cu.field = fn
static void *lib;
static CUresult (*gpa)(const char *, void **, int, u64, int *);
static u64 gpa_flags;

static void *lookup(const char *mode, const char *name, const char *base)
{
    void *p = NULL;
    if (strcmp(mode, "dlsym") == 0)
        p = dlsym(lib, name);
    else if (gpa(base, &p, 12000, gpa_flags, NULL) != 0)
        p = NULL;
    if (p == NULL) {
        fprintf(stderr, "cannot find %s\n", name);
        exit(3);
    }
    return p;
}

static void bind(const char *mode)
{
    if (strcmp(mode, "direct") == 0) {
        DIRECT(alloc, cuMemAlloc_v2); DIRECT(free_, cuMemFree_v2);
        DIRECT(alloc_async, cuMemAllocAsync); DIRECT(free_async, cuMemFreeAsync);
        DIRECT(alloc_pool, cuMemAllocFromPoolAsync); DIRECT(pool_create, cuMemPoolCreate);
        DIRECT(pool_destroy, cuMemPoolDestroy); DIRECT(trim, cuMemPoolTrimTo);
        DIRECT(create, cuMemCreate); DIRECT(release, cuMemRelease); DIRECT(map, cuMemMap);
        DIRECT(unmap, cuMemUnmap); DIRECT(pitch, cuMemAllocPitch_v2);
        DIRECT(managed, cuMemAllocManaged); DIRECT(array, cuArrayCreate_v2);
        DIRECT(array3d, cuArray3DCreate_v2); DIRECT(mipmap, cuMipmappedArrayCreate);
        DIRECT(array_destroy, cuArrayDestroy); DIRECT(mipmap_destroy, cuMipmappedArrayDestroy);
        DIRECT(info, cuMemGetInfo_v2); DIRECT(devtotal, cuDeviceTotalMem_v2);
        return;
    }
    lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        exit(3);
    }
    int ptsz = strcmp(mode, "gpa-ptsz") == 0;
    if (strncmp(mode, "gpa", 3) == 0) {
        *(void **)&gpa = dlsym(lib, "cuGetProcAddress_v2");
        gpa_flags = ptsz ? 2 : 0;
    }
#define LOOK(field, name, base) *(void **)&cu.field = lookup(mode, name, base)
    LOOK(alloc, "cuMemAlloc_v2", "cuMemAlloc");
    LOOK(free_, "cuMemFree_v2", "cuMemFree");
    LOOK(alloc_async, ptsz ? "cuMemAllocAsync_ptsz" : "cuMemAllocAsync", "cuMemAllocAsync");
    LOOK(free_async, ptsz ? "cuMemFreeAsync_ptsz" : "cuMemFreeAsync", "cuMemFreeAsync");
    LOOK(alloc_pool, ptsz ? "cuMemAllocFromPoolAsync_ptsz" : "cuMemAllocFromPoolAsync",
         "cuMemAllocFromPoolAsync");
    LOOK(pool_create, "cuMemPoolCreate", "cuMemPoolCreate");
    LOOK(pool_destroy, "cuMemPoolDestroy", "cuMemPoolDestroy");
    LOOK(trim, "cuMemPoolTrimTo", "cuMemPoolTrimTo");
    LOOK(create, "cuMemCreate", "cuMemCreate");
    LOOK(release, "cuMemRelease", "cuMemRelease");
    LOOK(map, "cuMemMap", "cuMemMap");
    LOOK(unmap, "cuMemUnmap", "cuMemUnmap");
    LOOK(pitch, "cuMemAllocPitch_v2", "cuMemAllocPitch");
    LOOK(managed, "cuMemAllocManaged", "cuMemAllocManaged");
    LOOK(array, "cuArrayCreate_v2", "cuArrayCreate");
    LOOK(array3d, "cuArray3DCreate_v2", "cuArray3DCreate");
    LOOK(mipmap, "cuMipmappedArrayCreate", "cuMipmappedArrayCreate");
    LOOK(array_destroy, "cuArrayDestroy", "cuArrayDestroy");
    LOOK(mipmap_destroy, "cuMipmappedArrayDestroy", "cuMipmappedArrayDestroy");
    LOOK(info, "cuMemGetInfo_v2", "cuMemGetInfo");
    LOOK(devtotal, "cuDeviceTotalMem_v2", "cuDeviceTotalMem");
}

#define MAX 100000
static u64 ptrs[MAX], async_ptrs[MAX], handles[MAX], maps[MAX], sizes[MAX];
static void *arrays[MAX];
static int arrays_mip[MAX];
static int n_ptrs, n_async, n_handles, n_maps, n_arrays;
static void *pool;

static u64 arg(const char *op, int i)
{
    const char *p = op;
    for (int k = 0; k < i; k++) {
        p = strchr(p, ':');
        if (p == NULL)
            return 0;
        p++;
    }
    return strtoull(p, NULL, 0);
}

static int DEVICE_PROP[8] = {1, 0, 1, 0}; /* pinned, device location 0 */
static const int HOST_PROP[8] = {1, 0, 2, 0};   /* CU_MEM_LOCATION_TYPE_HOST */

static CUresult vmm(u64 bytes, const int *prop)
{
    u64 h, va;
    CUresult r = cu.create(&h, bytes, prop, 0);
    if (r != 0)
        return r;
    cuMemAddressReserve(&va, bytes, 0, 0, 0);
    cu.map(va, bytes, 0, h, 0);
    handles[n_handles++] = h;
    sizes[n_maps] = bytes;
    maps[n_maps++] = va;
    return 0;
}

static void *get_pool(void)
{
    if (pool == NULL)
        cu.pool_create(&pool, NULL);
    return pool;
}

static void run(const char *op)
{
    u64 p = 0, a = arg(op, 1);
    CUresult r = 0;
    if (!strncmp(op, "alloc:", 6)) {
        r = cu.alloc(&p, a);
        if (!r) ptrs[n_ptrs++] = p;
        printf("alloc %d\n", r);
    } else if (!strncmp(op, "fill:", 5) || !strncmp(op, "asyncfill:", 10) ||
               !strncmp(op, "poolfill:", 9) || !strncmp(op, "vmmfill:", 8)) {
        u64 total = 0;
        for (;;) {
            if (op[0] == 'f') { r = cu.alloc(&p, a); if (!r) ptrs[n_ptrs++] = p; }
            else if (op[0] == 'a') { r = cu.alloc_async(&p, a, NULL); if (!r) async_ptrs[n_async++] = p; }
            else if (op[0] == 'p') { r = cu.alloc_pool(&p, a, get_pool(), NULL); if (!r) async_ptrs[n_async++] = p; }
            else r = vmm(a, DEVICE_PROP);
            if (r)
                break;
            total += a;
        }
        printf("fill %llu %d\n", total, r);
    } else if (!strncmp(op, "async:", 6)) {
        r = cu.alloc_async(&p, a, NULL);
        if (!r) async_ptrs[n_async++] = p;
        printf("async %d\n", r);
    } else if (!strcmp(op, "freeasync")) {
        for (int i = 0; i < n_async; i++) r |= cu.free_async(async_ptrs[i], NULL);
        n_async = 0;
        printf("freeasync %d\n", r);
    } else if (!strcmp(op, "trim")) {
        void *dp;
        cuDeviceGetMemPool(&dp, 0);
        printf("trim %d\n", cu.trim(dp, 0) | (pool ? cu.trim(pool, 0) : 0));
    } else if (!strncmp(op, "pool:", 5)) {
        r = cu.alloc_pool(&p, a, get_pool(), NULL);
        if (!r) async_ptrs[n_async++] = p;
        printf("pool %d\n", r);
    } else if (!strcmp(op, "pooldestroy")) {
        printf("pooldestroy %d\n", cu.pool_destroy(get_pool()));
        pool = NULL;
        n_async = 0;
    } else if (!strncmp(op, "vmm:", 4)) {
        printf("vmm %d\n", vmm(a, DEVICE_PROP));
    } else if (!strncmp(op, "vmmhost:", 8)) {
        printf("vmmhost %d\n", vmm(a, HOST_PROP));
    } else if (!strcmp(op, "vmmrelease")) {
        for (int i = 0; i < n_handles; i++) r |= cu.release(handles[i]);
        n_handles = 0;
        printf("vmmrelease %d\n", r);
    } else if (!strcmp(op, "vmmunmap")) {
        for (int i = 0; i < n_maps; i++) r |= cu.unmap(maps[i], sizes[i]);
        n_maps = 0;
        printf("vmmunmap %d\n", r);
    } else if (!strncmp(op, "pitch:", 6)) {
        size_t pitch = 0;
        r = cu.pitch(&p, &pitch, a, arg(op, 2), 4);
        if (!r) ptrs[n_ptrs++] = p;
        printf("pitch %d %zu\n", r, pitch);
    } else if (!strncmp(op, "managed:", 8)) {
        r = cu.managed(&p, a, 1);
        if (!r) ptrs[n_ptrs++] = p;
        printf("managed %d\n", r);
    } else if (!strncmp(op, "array:", 6)) {
        struct { size_t w, h; int format; unsigned ch; } d = {a, arg(op, 2), 0x20, 1};
        r = cu.array(&arrays[n_arrays], &d);
        if (!r) arrays_mip[n_arrays++] = 0;
        printf("array %d\n", r);
    } else if (!strncmp(op, "array3d:", 8) || !strncmp(op, "mipmap:", 7)) {
        int mip = op[0] == 'm';
        struct { size_t w, h, d; int format; unsigned ch, flags; } d = {
            a, arg(op, 2), mip ? 0 : arg(op, 3), 0x20, 1, 0};
        r = mip ? cu.mipmap(&arrays[n_arrays], &d, (unsigned)arg(op, 3))
                : cu.array3d(&arrays[n_arrays], &d);
        if (!r) arrays_mip[n_arrays++] = mip;
        printf("%s %d\n", mip ? "mipmap" : "array3d", r);
    } else if (!strcmp(op, "arraydestroy")) {
        for (int i = 0; i < n_arrays; i++)
            r |= arrays_mip[i] ? cu.mipmap_destroy(arrays[i]) : cu.array_destroy(arrays[i]);
        n_arrays = 0;
        printf("arraydestroy %d\n", r);
    } else if (!strcmp(op, "freeall")) {
        for (int i = 0; i < n_ptrs; i++) r |= cu.free_(ptrs[i]);
        n_ptrs = 0;
        printf("freeall %d\n", r);
    } else if (!strcmp(op, "freeunknown")) {
        printf("freeunknown %d\n", cu.free_(0xdead0000ull));
    } else if (!strcmp(op, "info")) {
        size_t f = 0, t = 0;
        r = cu.info(&f, &t);
        printf("info %d %zu %zu\n", r, f, t);
    } else if (!strcmp(op, "devtotal")) {
        size_t t = 0;
        r = cu.devtotal(&t, 0);
        printf("devtotal %d %zu\n", r, t);
    } else if (!strncmp(op, "device:", 7)) {
        void *ctx = NULL;
        r = cuDevicePrimaryCtxRetain(&ctx, (int)a);
        if (!r)
            r = cuCtxSetCurrent(ctx);
        printf("device %d\n", r);
    } else if (!strncmp(op, "vmmon:", 6)) {
        DEVICE_PROP[3] = (int)a;
        r = vmm(arg(op, 2), DEVICE_PROP);
        DEVICE_PROP[3] = 0;
        printf("vmmon %d\n", r);
    } else if (!strcmp(op, "used")) {
        printf("used %llu\n", fake_device_used());
    } else if (!strcmp(op, "wait") || !strcmp(op, "hold")) {
        printf("%s\n", op);
        fflush(stdout);
        char line[64];
        while (fgets(line, sizeof line, stdin) && op[0] == 'h')
            ;
    } else {
        fprintf(stderr, "unknown op %s\n", op);
        exit(2);
    }
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    bind(argv[1]);
    for (int i = 2; i < argc; i++)
        run(argv[i]);
    return 0;
}
