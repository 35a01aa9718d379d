/*
 * A pretend libcuda.so.1 for the allocation-cap tests (no GPU in CI).
 *
 * FAKE_CUDA_DEVICES devices (default 1) of FAKE_TOTAL bytes each per process; it
 * tracks the bytes really "allocated" on each, so a test can compare what the cap
 * let through with what a device holds.  FAKE_CUDA_VISIBLE ("2,0": ordinal 0 is
 * physical device 2, ...) reorders them the way CUDA_VISIBLE_DEVICES does; physical
 * device p has UUID GPU-1<p>111213-1415-1617-1819-1a1b1c1d1e1f (p in hex).  The
 * current device is the one whose primary context was made current last.  Pointers are fake addresses, never dereferenced.  The
 * stream-ordered pools behave like PyTorch's: freed blocks stay reserved
 * until cuMemPoolTrimTo.  cuGetProcAddress hands out the ABI variants the
 * real driver does ((cuMemAlloc, 3020) -> cuMemAlloc_v2, per-thread flag ->
 * _ptsz) as the addresses of this library's own exports.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define E __attribute__((visibility("default")))
#define FAKE_TOTAL (80ull << 30)
#define GRANULE (2ull << 20)
#define MAXN 65536
#define MAXDEV 8

typedef int CUresult;
typedef unsigned long long u64;
enum { OK = 0, INVALID = 1, OOM = 2 };

static u64 used_on[MAXDEV]; /* what each pretend (physical) device holds */
static int current;         /* the current context's ordinal */
#define device_used used_on[physical(current)]

static int n_devices(void)
{
    const char *n = getenv("FAKE_CUDA_DEVICES");
    int v = n ? atoi(n) : 1;
    return v < 1 ? 1 : v > MAXDEV ? MAXDEV : v;
}

/* The physical device behind ordinal `ordinal` (FAKE_CUDA_VISIBLE, else itself). */
static int physical(int ordinal)
{
    const char *v = getenv("FAKE_CUDA_VISIBLE");
    if (v == NULL)
        return ordinal;
    for (int i = 0; *v; i++) {
        int p = atoi(v);
        if (i == ordinal)
            return p >= 0 && p < MAXDEV ? p : 0;
        v = strchr(v, ',');
        if (v == NULL)
            break;
        v++;
    }
    return 0;
}
static u64 next_addr = 1ull << 40;

struct rec { u64 key, bytes, a, b; };
static struct rec recs[MAXN];   /* allocations, handles, arrays, mappings */
static int kinds[MAXN];         /* 0 free, 1 alloc, 2 vmm handle, 3 array, 4 mapping, 5 pool block */

static struct rec *add(int kind, u64 key, u64 bytes)
{
    for (int i = 0; i < MAXN; i++)
        if (!kinds[i]) {
            kinds[i] = kind;
            recs[i] = (struct rec){key, bytes, 0, 0};
            return &recs[i];
        }
    abort();
}

static int lookup(int kind, u64 key)
{
    for (int i = 0; i < MAXN; i++)
        if (kinds[i] == kind && recs[i].key == key)
            return i;
    return -1;
}

static int take(u64 bytes)
{
    if (device_used + bytes > FAKE_TOTAL)
        return 0;
    device_used += bytes;
    return 1;
}

E u64 fake_device_used(void) { return device_used; }
E CUresult cuInit(unsigned flags) { (void)flags; return OK; }
E CUresult cuDeviceGet(int *dev, int ordinal)
{
    *dev = ordinal;
    return ordinal >= 0 && ordinal < n_devices() ? OK : INVALID;
}
E CUresult cuCtxGetDevice(int *dev) { *dev = current; return OK; }
E CUresult cuDeviceGetUuid(unsigned char *uuid, int dev)
{
    for (int i = 0; i < 16; i++)
        uuid[i] = (unsigned char)(0x10 + i);
    uuid[0] = (unsigned char)(0x10 + physical(dev));
    return OK;
}
E CUresult cuDeviceTotalMem_v2(size_t *bytes, int dev) { (void)dev; *bytes = FAKE_TOTAL; return OK; }
E CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total)
{
    *free_b = FAKE_TOTAL - device_used;
    *total = FAKE_TOTAL;
    return OK;
}

static CUresult alloc(u64 *dptr, u64 bytes)
{
    if (bytes == 0)
        return INVALID;
    if (!take(bytes))
        return OOM;
    *dptr = next_addr;
    next_addr += (bytes + GRANULE - 1) / GRANULE * GRANULE;
    add(1, *dptr, bytes);
    return OK;
}

E CUresult cuMemAlloc_v2(u64 *dptr, size_t bytes) { return alloc(dptr, bytes); }
E CUresult cuMemAllocManaged(u64 *dptr, size_t bytes, unsigned flags) { (void)flags; return alloc(dptr, bytes); }
E CUresult cuMemAllocPitch_v2(u64 *dptr, size_t *pitch, size_t w, size_t h, unsigned elem)
{
    (void)elem;
    *pitch = (w + 511) / 512 * 512;
    return alloc(dptr, *pitch * h);
}
E CUresult cuMemFree_v2(u64 dptr)
{
    int i = lookup(1, dptr);
    if (i < 0) {
        i = lookup(5, dptr); /* cuMemFree of a stream-ordered pointer */
        if (i < 0)
            return INVALID;
    }
    if (kinds[i] == 1)
        device_used -= recs[i].bytes;
    else { /* back to its pool */
        struct rec *pool = (struct rec *)(uintptr_t)recs[i].a;
        pool->a -= recs[i].bytes;
    }
    kinds[i] = 0;
    return OK;
}

/* Pools: key = the pool's address, bytes unused, a = used, b = reserved. */
static struct rec default_pool;
E CUresult cuDeviceGetMemPool(void **pool, int dev) { (void)dev; *pool = &default_pool; return OK; }
E CUresult cuMemPoolCreate(void **pool, const void *props)
{
    (void)props;
    *pool = calloc(1, sizeof(struct rec));
    return OK;
}
E CUresult cuMemPoolDestroy(void *pool)
{
    struct rec *p = pool;
    device_used -= p->b;
    p->a = p->b = 0;
    if (p != &default_pool)
        free(p);
    return OK;
}
E CUresult cuMemPoolGetAttribute(void *pool, int attr, void *value)
{
    struct rec *p = pool;
    if (attr == 5) *(u64 *)value = p->b;
    else if (attr == 7) *(u64 *)value = p->a;
    else return INVALID;
    return OK;
}
/* How a pool grows when its free space cannot serve a request.  By default by the
 * shortfall rounded to 2 MiB; with FAKE_CUDA_POOL_GROWTH=G by the whole request
 * rounded up to G, as a real driver may (its own granularity, or free space too
 * fragmented to use), which is more than the cap library's estimate. */
static u64 pool_grow_by(u64 bytes, u64 free_space)
{
    const char *g = getenv("FAKE_CUDA_POOL_GROWTH");
    u64 granule = g ? strtoull(g, NULL, 0) : 0;
    if (granule == 0)
        return (bytes - free_space + GRANULE - 1) / GRANULE * GRANULE;
    return (bytes + granule - 1) / granule * granule;
}
static CUresult pool_alloc(u64 *dptr, u64 bytes, struct rec *p)
{
    if (bytes == 0)
        return INVALID;
    if (p->b - p->a < bytes) {
        u64 grow = pool_grow_by(bytes, p->b - p->a);
        if (!take(grow))
            return OOM;
        p->b += grow;
    }
    p->a += bytes;
    *dptr = next_addr;
    next_addr += (bytes + GRANULE - 1) / GRANULE * GRANULE;
    add(5, *dptr, bytes)->a = (u64)(uintptr_t)p;
    return OK;
}
E CUresult cuMemAllocAsync(u64 *d, size_t n, void *s) { (void)s; return pool_alloc(d, n, &default_pool); }
E CUresult cuMemAllocAsync_ptsz(u64 *d, size_t n, void *s) { (void)s; return pool_alloc(d, n, &default_pool); }
E CUresult cuMemAllocFromPoolAsync(u64 *d, size_t n, void *p, void *s) { (void)s; return pool_alloc(d, n, p); }
E CUresult cuMemAllocFromPoolAsync_ptsz(u64 *d, size_t n, void *p, void *s) { (void)s; return pool_alloc(d, n, p); }
static CUresult pool_free(u64 d)
{
    int i = lookup(5, d);
    if (i < 0)
        return INVALID;
    ((struct rec *)(uintptr_t)recs[i].a)->a -= recs[i].bytes; /* stays reserved */
    kinds[i] = 0;
    return OK;
}
E CUresult cuMemFreeAsync(u64 d, void *s) { (void)s; return pool_free(d); }
E CUresult cuMemFreeAsync_ptsz(u64 d, void *s) { (void)s; return pool_free(d); }
E CUresult cuMemPoolTrimTo(void *pool, size_t keep)
{
    struct rec *p = pool;
    u64 floor = p->a > keep ? p->a : keep;
    if (p->b > floor) {
        device_used -= p->b - floor;
        p->b = floor;
    }
    return OK;
}

/* VMM: handle record a = mappings, b = released. */
E CUresult cuMemAddressReserve(u64 *ptr, size_t size, size_t align, u64 addr, u64 flags)
{
    (void)align; (void)addr; (void)flags;
    *ptr = next_addr;
    next_addr += size;
    return OK;
}
E CUresult cuMemAddressFree(u64 ptr, size_t size) { (void)ptr; (void)size; return OK; }
E CUresult cuMemCreate(u64 *handle, size_t size, const int *prop, u64 flags)
{
    (void)flags;
    int device = prop[2] == 1; /* location.type == CU_MEM_LOCATION_TYPE_DEVICE */
    if (device && !take(size))
        return OOM;
    *handle = next_addr++;
    struct rec *r = add(2, *handle, size);
    r->a = 0;
    r->b = device ? 0 : 2; /* 2: host memory, never counted */
    return OK;
}
static void maybe_free_handle(int i)
{
    if (recs[i].a == 0 && (recs[i].b & 1)) {
        if (!(recs[i].b & 2))
            device_used -= recs[i].bytes;
        kinds[i] = 0;
    }
}
E CUresult cuMemRelease(u64 handle)
{
    int i = lookup(2, handle);
    if (i < 0 || (recs[i].b & 1))
        return INVALID;
    recs[i].b |= 1;
    maybe_free_handle(i);
    return OK;
}
E CUresult cuMemMap(u64 ptr, size_t size, size_t offset, u64 handle, u64 flags)
{
    (void)offset; (void)flags;
    int i = lookup(2, handle);
    if (i < 0 || (recs[i].b & 1))
        return INVALID;
    recs[i].a++;
    add(4, ptr, size)->a = handle;
    return OK;
}
E CUresult cuMemUnmap(u64 ptr, size_t size)
{
    for (int j = 0; j < MAXN; j++)
        if (kinds[j] == 4 && recs[j].key >= ptr && recs[j].key < ptr + size) {
            int i = lookup(2, recs[j].a);
            kinds[j] = 0;
            if (i >= 0) {
                recs[i].a--;
                maybe_free_handle(i);
            }
        }
    return OK;
}

/* Arrays: width x height x depth x channels x 4 bytes (float formats in the tests). */
struct desc2 { size_t w, h; int format; unsigned ch; };
struct desc3 { size_t w, h, d; int format; unsigned ch; unsigned flags; };
static u64 one(size_t v) { return v ? v : 1; }
static CUresult array(void **out, u64 bytes)
{
    if (!take(bytes))
        return OOM;
    *out = (void *)(uintptr_t)next_addr++;
    add(3, (u64)(uintptr_t)*out, bytes);
    return OK;
}
E CUresult cuArrayCreate_v2(void **a, const struct desc2 *d) { return array(a, one(d->w) * one(d->h) * d->ch * 4); }
E CUresult cuArray3DCreate_v2(void **a, const struct desc3 *d) { return array(a, one(d->w) * one(d->h) * one(d->d) * d->ch * 4); }
E CUresult cuMipmappedArrayCreate(void **a, const struct desc3 *d, unsigned levels)
{
    u64 total = 0;
    for (unsigned l = 0; l < levels; l++)
        total += one(d->w >> l) * one(d->h >> l) * one(d->d >> l) * d->ch * 4;
    return array(a, total);
}
static CUresult array_free(void *a)
{
    int i = lookup(3, (u64)(uintptr_t)a);
    if (i < 0)
        return INVALID;
    device_used -= recs[i].bytes;
    kinds[i] = 0;
    return OK;
}
E CUresult cuArrayDestroy(void *a) { return array_free(a); }
E CUresult cuMipmappedArrayDestroy(void *a) { return array_free(a); }

/* cuGetProcAddress: the variant the real driver picks for (name, version, flags). */
E CUresult cuGetProcAddress_v2(const char *, void **, int, u64, int *);
E CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, u64 flags)
{
    return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}

static const struct { const char *base; int ptsz; void *fn; } PROCS[] = {
    {"cuMemAlloc", 0, (void *)cuMemAlloc_v2},
    {"cuMemAllocPitch", 0, (void *)cuMemAllocPitch_v2},
    {"cuMemAllocManaged", 0, (void *)cuMemAllocManaged},
    {"cuMemFree", 0, (void *)cuMemFree_v2},
    {"cuMemAllocAsync", 0, (void *)cuMemAllocAsync},
    {"cuMemAllocAsync", 1, (void *)cuMemAllocAsync_ptsz},
    {"cuMemAllocFromPoolAsync", 0, (void *)cuMemAllocFromPoolAsync},
    {"cuMemAllocFromPoolAsync", 1, (void *)cuMemAllocFromPoolAsync_ptsz},
    {"cuMemFreeAsync", 0, (void *)cuMemFreeAsync},
    {"cuMemFreeAsync", 1, (void *)cuMemFreeAsync_ptsz},
    {"cuMemPoolTrimTo", 0, (void *)cuMemPoolTrimTo},
    {"cuMemPoolCreate", 0, (void *)cuMemPoolCreate},
    {"cuMemPoolDestroy", 0, (void *)cuMemPoolDestroy},
    {"cuMemCreate", 0, (void *)cuMemCreate},
    {"cuMemRelease", 0, (void *)cuMemRelease},
    {"cuMemMap", 0, (void *)cuMemMap},
    {"cuMemUnmap", 0, (void *)cuMemUnmap},
    {"cuMemAddressReserve", 0, (void *)cuMemAddressReserve},
    {"cuArrayCreate", 0, (void *)cuArrayCreate_v2},
    {"cuArray3DCreate", 0, (void *)cuArray3DCreate_v2},
    {"cuArrayDestroy", 0, (void *)cuArrayDestroy},
    {"cuMipmappedArrayCreate", 0, (void *)cuMipmappedArrayCreate},
    {"cuMipmappedArrayDestroy", 0, (void *)cuMipmappedArrayDestroy},
    {"cuMemPoolGetAttribute", 0, (void *)cuMemPoolGetAttribute},
    {"cuDeviceGetMemPool", 0, (void *)cuDeviceGetMemPool},
    {"cuCtxGetDevice", 0, (void *)cuCtxGetDevice},
    {"cuMemGetInfo", 0, (void *)cuMemGetInfo_v2},
    {"cuDeviceTotalMem", 0, (void *)cuDeviceTotalMem_v2},
    {"cuInit", 0, (void *)cuInit},
    {"cuGetProcAddress", 0, (void *)cuGetProcAddress_v2},
};

/* What a future driver might hand out for cuMemAlloc: an ABI the cap does not know. */
static CUresult mem_alloc_v9(u64 *dptr, size_t bytes) { return alloc(dptr, bytes); }

E CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, u64 flags,
                               int *status)
{
    if (version >= 99000 && strcmp(symbol, "cuMemAlloc") == 0) {
        *pfn = (void *)mem_alloc_v9;
        return OK;
    }
    int ptsz = (flags & 2) != 0; /* CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM */
    for (size_t i = 0; i < sizeof PROCS / sizeof PROCS[0]; i++)
        if (strcmp(PROCS[i].base, symbol) == 0) {
            /* entries without a _ptsz variant serve both */
            size_t j = i;
            if (ptsz && i + 1 < sizeof PROCS / sizeof PROCS[0] &&
                strcmp(PROCS[i + 1].base, symbol) == 0)
                j = i + 1;
            *pfn = PROCS[j].fn;
            if (status)
                *status = 0;
            return OK;
        }
    *pfn = NULL;
    if (status)
        *status = 1;
    return 500; /* CUDA_ERROR_NOT_FOUND */
}

/* Enough of the context API for programs written against the real driver. */
static char contexts[MAXDEV]; /* a context is the address of its ordinal's byte */
E CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev)
{
    if (dev < 0 || dev >= n_devices())
        return INVALID;
    *ctx = &contexts[dev];
    return OK;
}
E CUresult cuCtxSetCurrent(void *ctx)
{
    if (ctx != NULL)
        current = (int)((char *)ctx - contexts);
    return OK;
}
E CUresult cuStreamSynchronize(void *stream) { (void)stream; return OK; }
