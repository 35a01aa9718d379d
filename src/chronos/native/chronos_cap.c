/*
 * chronos_cap: refuse, at allocation time, device allocations that would take
 * a partition over its bytes (see docs/ALLOCATION_CAP.md for the design).
 *
 * Preloaded (LD_PRELOAD) into every process of a partition by `chronos run`
 * and Partition.limits_env().  The partition's processes share one counter per
 * GPU of the partition, each in a memory-mapped file; CHRONOS_CAP_FILE names them
 * (colon-separated, in the partition's share order).  Each file names its GPU by
 * UUID, and an allocation is charged to the file of the device it lands on (the
 * current context's device, cuCtxGetDevice, mapped to its UUID once), so any
 * CUDA_VISIBLE_DEVICES form (index, UUID, reordered) finds the right share and a
 * device outside the partition gets nothing.  An allocation adds its bytes
 * with one atomic fetch_add and, if that went over the cap, subtracts them
 * again and fails with CUDA_ERROR_OUT_OF_MEMORY, which every framework turns
 * into its own clean out-of-memory error.  cuMemGetInfo_v2 and
 * cuDeviceTotalMem_v2 report the share, so frameworks size themselves to it.
 *
 * Programs reach the driver three ways, and all three lead here:
 *   - exported cu* symbols (programs linked with -lcuda): we define them;
 *   - dlopen("libcuda.so.1") + dlsym(handle, name) (XLA, static cudart): we
 *     define dlsym and return our wrapper for the exact names we wrap;
 *   - cuGetProcAddress[_v2] (every cudart): we return our wrapper when the
 *     driver hands out the very function we wrap.
 *
 * Built with the system C compiler and no CUDA headers: the few CUDA types
 * used are declared below with the driver API's ABI.  Outside a partition
 * (no CHRONOS_CAP_FILE) every call is forwarded unchanged, except in the
 * administrator's machine-wide mode (a "guard" file, see guard_floor()).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chronos_cap.h"

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------ CUDA ABI */
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef void *CUstream;
typedef void *CUmemoryPool;
typedef void *CUarray;
typedef void *CUmipmappedArray;
typedef void *CUcontext;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CU_MEM_LOCATION_TYPE_DEVICE = 1,
    CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT = 5,
    CU_MEMPOOL_ATTR_USED_MEM_CURRENT = 7,
};
#define CU_STREAM_PER_THREAD ((CUstream)0x2) /* what stream 0 means to a _ptsz entry */

typedef struct { /* the leading fields of CUmemAllocationProp */
    int type;
    int requested_handle_types;
    int location_type;
    int location_id;
} CUmemAllocationPropHead;

typedef struct {
    size_t width, height;
    int format;
    unsigned channels;
} CUarrayDesc; /* CUDA_ARRAY_DESCRIPTOR_v2 */

typedef struct {
    size_t width, height, depth;
    int format;
    unsigned channels;
    unsigned flags;
} CUarray3DDesc; /* CUDA_ARRAY3D_DESCRIPTOR_v2 */

typedef struct {
    unsigned char bytes[16];
} CUuuid;

/* ------------------------------------------------- the entry points we wrap */
/* One X-macro list drives the name table, the real-pointer cache and the
 * wrappers' declarations, so a name can never be matched without a wrapper. */
#define WRAPPED(X)                                                                         \
    X(cuMemAlloc_v2, "cuMemAlloc")                                                         \
    X(cuMemAllocPitch_v2, "cuMemAllocPitch")                                               \
    X(cuMemAllocManaged, "cuMemAllocManaged")                                              \
    X(cuMemFree_v2, "cuMemFree")                                                           \
    X(cuMemAllocAsync, "cuMemAllocAsync")                                                  \
    X(cuMemAllocAsync_ptsz, "cuMemAllocAsync")                                             \
    X(cuMemAllocFromPoolAsync, "cuMemAllocFromPoolAsync")                                  \
    X(cuMemAllocFromPoolAsync_ptsz, "cuMemAllocFromPoolAsync")                             \
    X(cuMemFreeAsync, "cuMemFreeAsync")                                                    \
    X(cuMemFreeAsync_ptsz, "cuMemFreeAsync")                                               \
    X(cuMemPoolTrimTo, "cuMemPoolTrimTo")                                                  \
    X(cuMemPoolDestroy, "cuMemPoolDestroy")                                                \
    X(cuMemCreate, "cuMemCreate")                                                          \
    X(cuMemRelease, "cuMemRelease")                                                        \
    X(cuMemMap, "cuMemMap")                                                                \
    X(cuMemUnmap, "cuMemUnmap")                                                            \
    X(cuArrayCreate_v2, "cuArrayCreate")                                                   \
    X(cuArray3DCreate_v2, "cuArray3DCreate")                                               \
    X(cuArrayDestroy, "cuArrayDestroy")                                                    \
    X(cuMipmappedArrayCreate, "cuMipmappedArrayCreate")                                    \
    X(cuMipmappedArrayDestroy, "cuMipmappedArrayDestroy")                                  \
    X(cuMemGetInfo_v2, "cuMemGetInfo")                                                     \
    X(cuDeviceTotalMem_v2, "cuDeviceTotalMem")                                             \
    X(cuGetProcAddress, "cuGetProcAddress")                                                \
    X(cuGetProcAddress_v2, "cuGetProcAddress")

/* Driver functions we call but do not wrap. */
#define HELPERS(X)                                                                         \
    X(cuCtxGetDevice)                                                                      \
    X(cuDeviceGetMemPool)                                                                  \
    X(cuMemPoolGetAttribute)                                                               \
    X(cuDeviceGetUuid)                                                                     \
    X(cuDeviceGetUuid_v2)                                                                  \
    X(cuStreamSynchronize)

enum {
#define ID(fn, base) ID_##fn,
    WRAPPED(ID)
#undef ID
#define HID(fn) ID_##fn,
    HELPERS(HID)
#undef HID
    N_IDS
};

/* Names only up here; the wrappers' addresses are tabled at the end of the file. */
static const char *const NAMES[] = {
#define NAME(fn, base) #fn,
    WRAPPED(NAME)
#undef NAME
#define HNAME(fn) #fn,
    HELPERS(HNAME)
#undef HNAME
};

/* What cuGetProcAddress is asked for, e.g. cuMemAllocAsync for ..._ptsz. */
static const char *const BASES[] = {
#define BASE(fn, base) base,
    WRAPPED(BASE)
#undef BASE
};
#define N_WRAPPED (sizeof(BASES) / sizeof(BASES[0]))

/* ---------------------------------------------------------- the real dlsym */
typedef void *(*dlsym_fn)(void *, const char *);
static dlsym_fn real_dlsym;

static void find_real_dlsym(void)
{
    /* dlvsym is not interposed, so this cannot recurse into our dlsym. */
    static const char *const versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17"};
    for (size_t i = 0; i < sizeof(versions) / sizeof(versions[0]) && !real_dlsym; i++)
        real_dlsym = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", versions[i]);
}

/* -------------------------------------------------- the real driver entries */
static void *_Atomic reals[N_IDS];
static void *_Atomic driver;

static void *driver_handle(void)
{
    void *h = atomic_load(&driver);
    if (h == NULL) {
        h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
        if (h == NULL)
            h = dlopen("libcuda.so.1", RTLD_LAZY);
        atomic_store(&driver, h);
    }
    return h;
}

static void *real(int id)
{
    void *p = atomic_load(&reals[id]);
    if (p == NULL) {
        void *h = driver_handle();
        if (h == NULL || real_dlsym == NULL)
            return NULL;
        p = real_dlsym(h, NAMES[id]);
        atomic_store(&reals[id], p);
    }
    return p;
}

#define CALL_REAL(fn, types, ...)                                                          \
    (real(ID_##fn) ? ((CUresult(*) types)real(ID_##fn))(__VA_ARGS__)                   \
                   : CUDA_ERROR_NOT_INITIALIZED)

/* ------------------------------------------------ the partition's counters */
/* One share per GPU of the partition: its mapped file and this process's slot in it. */
struct share {
    struct cap_header *cap;
    struct cap_slot *slots;
    _Atomic int my_slot; /* index of this process's slot, -1 none yet */
};
static struct share shares[CAP_MAX_SHARES];
static int n_shares;                /* 0: not in a partition (set once, in the constructor) */
static _Atomic int my_pid;          /* the pid the slots were claimed for (fork) */
static pthread_mutex_t tables_lock = PTHREAD_MUTEX_INITIALIZER; /* this process only */

/* CUdevice ordinal -> share: 0 not looked up yet, k + 1 share k, -1 outside the
 * partition.  Written once per device (racing threads compute the same value), so
 * the hot path is one relaxed load. */
#define MAX_ORDINALS 64
#define OUTSIDE (-1)
static _Atomic int share_of_ordinal[MAX_ORDINALS];

static void say_once(const char *why)
{
    static atomic_flag said = ATOMIC_FLAG_INIT;
    if (!atomic_flag_test_and_set(&said) && getenv("CHRONOS_CAP_QUIET") == NULL)
        fprintf(stderr, "chronos: allocation-time cap unavailable (%s); "
                        "the sampling hard cap still applies\n", why);
}

static struct cap_header *map_cap_file(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        say_once(strerror(errno));
        return NULL;
    }
    struct stat st;
    void *map = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size >= (off_t)CAP_FILE_BYTES)
        map = mmap(NULL, CAP_FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        say_once("the accounting file is too short or cannot be mapped");
        return NULL;
    }
    struct cap_header *h = map;
    if (h->magic != CAP_MAGIC || h->version != CAP_VERSION || h->slots != CAP_SLOTS) {
        munmap(map, CAP_FILE_BYTES);
        say_once("the accounting file has an unknown format");
        return NULL;
    }
    return h;
}

/* CHRONOS_CAP_FILE: one path per GPU of the partition, ':'-separated, primary first.
 * All or nothing: a group with one file missing is not capped at allocation time
 * (the sampling hard cap still is), rather than capped on some GPUs only. */
static void open_cap_files(void)
{
    const char *list = getenv("CHRONOS_CAP_FILE");
    if (list == NULL || list[0] == '\0')
        return;
    struct share found[CAP_MAX_SHARES];
    int n = 0;
    for (const char *p = list; *p && n <= (int)CAP_MAX_SHARES;) {
        const char *end = strchr(p, ':');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char path[4096];
        if (len > 0 && len < sizeof path && n < (int)CAP_MAX_SHARES) {
            memcpy(path, p, len);
            path[len] = '\0';
            struct cap_header *h = map_cap_file(path);
            if (h == NULL)
                goto fail;
            found[n].cap = h;
            found[n].slots = (struct cap_slot *)((char *)h + CAP_HEADER_BYTES);
            n++;
        } else if (len > 0) {
            say_once("too many accounting files, or a path too long");
            goto fail;
        }
        p += len + (end != NULL);
    }
    for (int i = 0; i < n; i++) {
        shares[i].cap = found[i].cap;
        shares[i].slots = found[i].slots;
        atomic_store(&shares[i].my_slot, -1);
    }
    n_shares = n;
    return;
fail:
    for (int i = 0; i < n; i++)
        munmap(found[i].cap, CAP_FILE_BYTES);
}

/* "GPU-1a2b...": the hex digits after the prefix, without dashes, lower case; what
 * NVML's UUID strings (GPU- and MIG-) and cuDeviceGetUuid's bytes have in common. */
static void uuid_digits(const char *text, char out[33])
{
    const char *p = strchr(text, '-');
    p = p ? p + 1 : text;
    int n = 0;
    for (; *p && n < 32; p++) {
        char c = *p;
        if (c >= 'A' && c <= 'F')
            c = (char)(c - 'A' + 'a');
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))
            out[n++] = c;
        else if (c != '-')
            break;
    }
    out[n] = '\0';
}

static int device_uuid(CUdevice dev, char out[33])
{
    CUuuid id;
    CUresult r = real(ID_cuDeviceGetUuid_v2)
                     ? CALL_REAL(cuDeviceGetUuid_v2, (CUuuid *, CUdevice), &id, dev)
                     : CALL_REAL(cuDeviceGetUuid, (CUuuid *, CUdevice), &id, dev);
    if (r != CUDA_SUCCESS)
        return 0;
    for (int i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", id.bytes[i]);
    return 1;
}

/* Which share counts device `dev`: the file naming its UUID; a file without a UUID
 * (a backend that has none) counts the device at its own position. */
static int lookup_share(CUdevice dev)
{
    char mine[33] = "";
    int known = device_uuid(dev, mine);
    for (int i = 0; i < n_shares; i++) {
        char want[33];
        uuid_digits(shares[i].cap->device_uuid, want);
        if (want[0] == '\0' ? i == dev : (known && strcmp(want, mine) == 0))
            return i;
    }
    return OUTSIDE;
}

static struct share *share_of(CUdevice dev)
{
    if (n_shares == 0 || dev < 0 || dev >= MAX_ORDINALS)
        return NULL;
    int v = atomic_load_explicit(&share_of_ordinal[dev], memory_order_relaxed);
    if (v == 0) {
        int k = lookup_share(dev);
        v = k == OUTSIDE ? OUTSIDE : k + 1;
        atomic_store_explicit(&share_of_ordinal[dev], v, memory_order_relaxed);
    }
    return v > 0 ? &shares[v - 1] : NULL;
}

/* The share an allocation now lands on: the current context's device.  Without a
 * current context the driver refuses the allocation itself; the primary share is
 * charged meanwhile (the charge goes back when the driver fails). */
static struct share *current_share(void)
{
    CUdevice dev = 0;
    if (n_shares == 0)
        return NULL; /* outside a partition: no driver call added to any allocation */
    if (CALL_REAL(cuCtxGetDevice, (CUdevice *), &dev) != CUDA_SUCCESS)
        return &shares[0];
    return share_of(dev);
}

static uint64_t start_ticks_of(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    if (p == NULL)
        return 0;
    p += 2;
    for (int field = 3; field < 22 && p; field++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    return p ? strtoull(p, NULL, 10) : 0;
}

/* What the share's allocations may reach: its bytes less the margin kept for
 * memory the driver takes on its own (lazily loaded kernels, pool rounding). */
static int64_t allowed_bytes(const struct share *sh)
{
    return sh->cap->limit_bytes - sh->cap->margin_bytes;
}

/* Bytes of this process's slot change: say so to the daemon's overhead correction. */
static void slot_add(struct cap_slot *s, int64_t n)
{
    atomic_fetch_add(&s->changes, 1);
    atomic_fetch_add(&s->bytes, n);
}

/* Give back a slot whose process is gone (killed by SIGKILL: no destructor ran). */
static void reclaim_dead_slots(struct share *sh)
{
    struct cap_slot *slots = sh->slots;
    for (unsigned i = 0; i < CAP_SLOTS; i++) {
        uint64_t pid = atomic_load(&slots[i].pid);
        uint64_t ticks = atomic_load(&slots[i].start_ticks);
        if (pid == 0 || pid == CAP_SLOT_RECLAIMING || ticks == 0)
            continue; /* free, being freed, or just claimed (start not yet written) */
        if (start_ticks_of((pid_t)pid) == ticks)
            continue; /* alive */
        if (!atomic_compare_exchange_strong(&slots[i].pid, &pid, CAP_SLOT_RECLAIMING))
            continue; /* someone else reclaims it */
        int64_t freed = atomic_exchange(&slots[i].bytes, 0) +
                        atomic_exchange(&slots[i].overhead, 0);
        atomic_fetch_sub(&sh->cap->used_bytes, freed);
        atomic_store(&slots[i].start_ticks, 0);
        atomic_store(&slots[i].pid, 0);
    }
}

static int claim_slot(struct share *sh, pid_t pid)
{
    struct cap_slot *slots = sh->slots;
    for (int attempt = 0; attempt < 2; attempt++) {
        for (unsigned i = 0; i < CAP_SLOTS; i++) {
            uint64_t expected = 0;
            if (atomic_compare_exchange_strong(&slots[i].pid, &expected, (uint64_t)pid)) {
                atomic_store(&slots[i].bytes, 0);
                int64_t reserve = sh->cap->reserve_bytes;
                atomic_store(&slots[i].overhead, reserve);
                atomic_fetch_add(&sh->cap->used_bytes, reserve);
                atomic_store(&slots[i].start_ticks, start_ticks_of(pid));
                return (int)i;
            }
        }
        reclaim_dead_slots(sh);
    }
    return -1; /* all slots live: still counted in used, just not reclaimable */
}

/* This process's slot on a share; claimed at its first call on that GPU (charges the
 * reserve there only: a rank that never touches GPU 1 pays nothing on it).  A
 * fork()ed child starts with none (after_fork_in_child), so the fast path needs no
 * getpid() system call. */
static struct cap_slot *slot(struct share *sh)
{
    int index = atomic_load_explicit(&sh->my_slot, memory_order_acquire);
    if (index >= 0)
        return index != INT32_MAX ? &sh->slots[index] : NULL;
    pthread_mutex_lock(&tables_lock);
    index = atomic_load(&sh->my_slot);
    if (index < 0) {
        pid_t pid = getpid();
        index = claim_slot(sh, pid);
        atomic_store(&my_pid, pid);
        if (index < 0)
            index = INT32_MAX; /* no free slot: counted, not reclaimable; do not retry */
        atomic_store_explicit(&sh->my_slot, index, memory_order_release);
    }
    pthread_mutex_unlock(&tables_lock);
    return index != INT32_MAX ? &sh->slots[index] : NULL;
}

static int64_t guard_floor(void);

/* Count a refusal where `chronos stats` reads it: the share's file, or the primary's
 * for an allocation on a GPU outside the partition. */
static void count_refused(struct share *sh)
{
    struct share *where = sh ? sh : &shares[0];
    atomic_fetch_add(&where->cap->refused, 1);
}

/* Add n bytes to share sh, or refuse (returns 0) if that goes over.  sh NULL in a
 * partition: a GPU outside it, where the process may take nothing. */
static int charge(struct share *sh, int64_t n)
{
    if (n_shares == 0)
        return 1;
    if (sh == NULL) {
        if (n <= 0)
            return 1;
        count_refused(NULL);
        return 0;
    }
    struct cap_slot *s = slot(sh);
    if (n <= 0)
        return 1;
    for (int attempt = 0; attempt < 2; attempt++) {
        /* Add first, then look: two processes can never both pass on the same bytes. */
        int64_t before = atomic_fetch_add(&sh->cap->used_bytes, n);
        if (before + n <= allowed_bytes(sh)) {
            if (s)
                slot_add(s, n);
            return 1;
        }
        atomic_fetch_sub(&sh->cap->used_bytes, n);
        if (attempt == 0)
            reclaim_dead_slots(sh); /* a killed member's share may be what is missing */
    }
    count_refused(sh);
    return 0;
}

/* Add n bytes unconditionally (memory the driver already gave, e.g. pool growth). */
static void force_charge(struct share *sh, int64_t n)
{
    if (sh == NULL || n == 0)
        return;
    struct cap_slot *s = slot(sh);
    atomic_fetch_add(&sh->cap->used_bytes, n);
    if (s)
        slot_add(s, n);
}

static void uncharge(struct share *sh, int64_t n) { force_charge(sh, -n); }

/* Exit: this process's memory goes with its contexts. */
__attribute__((destructor)) static void release_slot(void)
{
    if (atomic_load(&my_pid) != getpid())
        return;
    for (int k = 0; k < n_shares; k++) {
        int index = atomic_load(&shares[k].my_slot);
        if (index < 0 || index == INT32_MAX)
            continue;
        struct cap_slot *s = &shares[k].slots[index];
        int64_t freed = atomic_exchange(&s->bytes, 0) + atomic_exchange(&s->overhead, 0);
        atomic_fetch_sub(&shares[k].cap->used_bytes, freed);
        atomic_store(&s->start_ticks, 0);
        atomic_store(&s->pid, 0);
    }
}

/* --------------------------------------------- machine-wide guard mode */
/*
 * A process outside any partition, with the library preloaded machine-wide
 * (/etc/ld.so.preload), reads the daemon's guard file: one line per GPU,
 * "<NVML uuid> <bytes>", the memory reserved by partitions and not yet used.
 * An allocation that would leave less than that free is refused.  Returns
 * the floor for the current device, or -1 when there is none.
 */
static int64_t guard_floor(void)
{
    static _Atomic int enabled = -1;
    if (enabled == 0)
        return -1;
    if (getenv("CHRONOS_CAP_FILE") != NULL) {
        enabled = 0; /* a partition's process whose file failed: never the guard's floors */
        return -1;
    }
    const char *path = getenv("CHRONOS_CAP_GUARD");
    if (path == NULL)
        path = "/run/chronos/cap/unpartitioned";
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        if (enabled == -1 && getenv("CHRONOS_CAP_GUARD") == NULL)
            enabled = 0; /* machine-wide mode not set up: never look again */
        return -1;
    }
    enabled = 1;
    CUdevice dev = 0;
    CUuuid id;
    char want[48] = "";
    if (CALL_REAL(cuCtxGetDevice, (CUdevice *), &dev) == CUDA_SUCCESS &&
        CALL_REAL(cuDeviceGetUuid, (CUuuid *, CUdevice), &id, dev) == CUDA_SUCCESS) {
        const unsigned char *b = id.bytes;
        snprintf(want, sizeof want,
                 "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                 b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
                 b[12], b[13], b[14], b[15]);
    }
    char uuid[64];
    long long bytes;
    int64_t floor = -1;
    while (fscanf(f, "%63s %lld", uuid, &bytes) == 2)
        if (strcmp(uuid, want) == 0)
            floor = bytes;
    fclose(f);
    return floor;
}

/* Guard mode: refuse if the driver's free memory minus n would fall below the floor. */
static int guard_allows(int64_t n)
{
    int64_t floor = n_shares == 0 ? guard_floor() : -1;
    if (floor < 0 || n <= 0)
        return 1;
    size_t free_b = 0, total_b = 0;
    if (CALL_REAL(cuMemGetInfo_v2, (size_t *, size_t *), &free_b, &total_b) != CUDA_SUCCESS)
        return 1;
    return (int64_t)free_b - n >= floor;
}

static int admit(struct share *sh, int64_t n)
{
    return n_shares ? charge(sh, n) : guard_allows(n);
}

/* ------------------------------------------- per-process bookkeeping tables */
/* A small open-addressing map from a driver handle (pointer, VMM handle, array,
 * pool) to what we charged for it.  Guarded by tables_lock, which is private
 * to this process, so no other process can leave it held. */
struct item {
    uint64_t key; /* 0 = empty */
    int64_t bytes;
    int64_t a, b; /* per table: VMM maps/released, mapping handle, ... */
    struct share *sh; /* the GPU's share the bytes were charged to */
};
struct table {
    struct item *items;
    size_t cap; /* power of two */
    size_t n;
};

static struct table allocs, vmm_handles, vmm_maps, arrays, pools;

static size_t hash(uint64_t k, size_t cap_) { return (size_t)((k * 0x9E3779B97F4A7C15ull) >> 17) & (cap_ - 1); }

static struct item *find(struct table *t, uint64_t key)
{
    if (t->cap == 0 || key == 0)
        return NULL;
    for (size_t i = hash(key, t->cap);; i = (i + 1) & (t->cap - 1)) {
        if (t->items[i].key == key)
            return &t->items[i];
        if (t->items[i].key == 0)
            return NULL;
    }
}

static struct item *insert(struct table *t, uint64_t key)
{
    if (key == 0)
        return NULL;
    if ((t->n + 1) * 2 > t->cap) {
        size_t ncap = t->cap ? t->cap * 2 : 64;
        struct item *fresh = calloc(ncap, sizeof *fresh);
        if (fresh == NULL)
            return NULL;
        for (size_t i = 0; i < t->cap; i++)
            if (t->items[i].key) {
                size_t j = hash(t->items[i].key, ncap);
                while (fresh[j].key)
                    j = (j + 1) & (ncap - 1);
                fresh[j] = t->items[i];
            }
        free(t->items);
        t->items = fresh;
        t->cap = ncap;
    }
    size_t i = hash(key, t->cap);
    while (t->items[i].key && t->items[i].key != key)
        i = (i + 1) & (t->cap - 1);
    if (t->items[i].key == 0)
        t->n++;
    t->items[i] = (struct item){.key = key};
    return &t->items[i];
}

/* Is h cyclically in (i, j]? */
static int between(size_t i, size_t h, size_t j)
{
    return i <= j ? (i < h && h <= j) : (i < h || h <= j);
}

/* Delete with backward shift, so lookups never need tombstones. */
static void erase(struct table *t, struct item *it)
{
    size_t i = (size_t)(it - t->items);
    t->items[i].key = 0;
    t->n--;
    for (size_t j = (i + 1) & (t->cap - 1); t->items[j].key; j = (j + 1) & (t->cap - 1)) {
        if (!between(i, hash(t->items[j].key, t->cap), j)) {
            t->items[i] = t->items[j]; /* j may move back into the hole at i */
            t->items[j].key = 0;
            i = j;
        }
    }
}

static void remember(struct table *t, uint64_t key, int64_t bytes, struct share *sh)
{
    pthread_mutex_lock(&tables_lock);
    struct item *it = insert(t, key);
    if (it) {
        it->bytes = bytes;
        it->sh = sh;
    }
    pthread_mutex_unlock(&tables_lock);
    if (it == NULL)
        uncharge(sh, bytes); /* no memory for bookkeeping: rather forget than leak forever */
}

/* Remove key; return the bytes charged for it (0 for unknown keys) and, in *sh,
 * the share they were charged to (NULL for unknown keys). */
static int64_t forget(struct table *t, uint64_t key, struct share **sh)
{
    int64_t bytes = 0;
    *sh = NULL;
    pthread_mutex_lock(&tables_lock);
    struct item *it = find(t, key);
    if (it) {
        bytes = it->bytes;
        *sh = it->sh;
        erase(t, it);
    }
    pthread_mutex_unlock(&tables_lock);
    return bytes;
}

/*
 * After a create that admit() charged: on success the new object keeps the charge
 * under its key, on failure the charge goes back; outside a partition, nothing.
 * A macro so that key, read through the caller's out-pointer, is read only on
 * success: on failure the driver may leave it unset (or the pointer be NULL).
 */
#define SETTLE_CHARGE(r, table, key, bytes, sh)          \
    do {                                                 \
        if ((sh) != NULL) {                              \
            if ((r) == CUDA_SUCCESS)                     \
                remember((table), (key), (bytes), (sh)); \
            else                                         \
                uncharge((sh), (bytes));                 \
        }                                                \
    } while (0)

/* After a destroy the driver carried out: give back what the object was charged. */
static void release_charge(CUresult r, struct table *t, uint64_t key)
{
    if (r != CUDA_SUCCESS || n_shares == 0)
        return;
    struct share *sh;
    int64_t bytes = forget(t, key, &sh);
    uncharge(sh, bytes);
}

/* After fork() the child has no CUDA state and owns none of the parent's memory. */
static void after_fork_in_child(void)
{
    for (int k = 0; k < n_shares; k++)
        atomic_store(&shares[k].my_slot, -1);
    struct table *all[] = {&allocs, &vmm_handles, &vmm_maps, &arrays, &pools};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        free(all[i]->items);
        *all[i] = (struct table){0};
    }
    pthread_mutex_init(&tables_lock, NULL);
}

__attribute__((constructor)) static void start(void)
{
    find_real_dlsym();
    open_cap_files();
    pthread_atfork(NULL, NULL, after_fork_in_child);
}

/* ------------------------------------------------- synchronous allocations */
EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytes)
{
    struct share *sh = current_share();
    if (!admit(sh, (int64_t)bytes))
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = CALL_REAL(cuMemAlloc_v2, (CUdeviceptr *, size_t), dptr, bytes);
    SETTLE_CHARGE(r, &allocs, *dptr, (int64_t)bytes, sh);
    return r;
}

EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytes, unsigned flags)
{
    /* Managed memory may migrate to the host, but counting it as device
     * memory is what keeps the partition inside its bytes when it does not. */
    struct share *sh = current_share();
    if (!admit(sh, (int64_t)bytes))
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = CALL_REAL(cuMemAllocManaged, (CUdeviceptr *, size_t, unsigned), dptr, bytes,
                           flags);
    SETTLE_CHARGE(r, &allocs, *dptr, (int64_t)bytes, sh);
    return r;
}

EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width,
                                   size_t height, unsigned elem)
{
    /* The pitch is known only afterwards: charge the width rounded to 512 bytes
     * (the usual alignment) first, then correct to pitch * height. */
    int64_t guess = (int64_t)(((width + 511) / 512) * 512 * height);
    struct share *sh = current_share();
    if (!admit(sh, guess))
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = CALL_REAL(cuMemAllocPitch_v2, (CUdeviceptr *, size_t *, size_t, size_t,
                                                unsigned),
                           dptr, pitch, width, height, elem);
    if (sh == NULL)
        return r;
    if (r != CUDA_SUCCESS) {
        uncharge(sh, guess);
        return r;
    }
    int64_t actual = (int64_t)(*pitch * height);
    force_charge(sh, actual - guess);
    remember(&allocs, *dptr, actual, sh);
    return r;
}

/* Pools the stream-ordered allocator used in this process: pool -> bytes charged. */
static int64_t reconcile_pool(CUmemoryPool pool, struct share *sh);
static void reconcile_all_pools(void);

EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    CUresult r = CALL_REAL(cuMemFree_v2, (CUdeviceptr), dptr);
    if (r == CUDA_SUCCESS && n_shares) {
        struct share *sh;
        int64_t bytes = forget(&allocs, dptr, &sh); /* 0 for pointers we never saw */
        if (bytes)
            uncharge(sh, bytes);
        else
            reconcile_all_pools(); /* cuMemFree of a stream-ordered pointer */
    }
    return r;
}

/* ------------------------------------------------ stream-ordered allocator */
/*
 * What an async pool costs is what it has reserved from the device
 * (RESERVED_MEM_CURRENT), not its live blocks: PyTorch keeps freed blocks in
 * the pool.  Before an allocation we charge the part of it the pool's free
 * space cannot cover (rounded up to 2 MiB), so the cap holds before the pool
 * grows; afterwards the charge is set to what the pool really reserves.  The
 * driver may grow a pool by more than that estimate (its own granularity, or
 * free space too fragmented to use); if the real growth takes the partition
 * over, the allocation is undone and refused (see undo_pool_alloc).
 */
static int pool_attr(CUmemoryPool pool, int attr, int64_t *value)
{
    uint64_t v = 0;
    if (CALL_REAL(cuMemPoolGetAttribute, (CUmemoryPool, int, void *), pool, attr, &v) !=
        CUDA_SUCCESS)
        return 0;
    *value = (int64_t)v;
    return 1;
}

/* Charge the pool for what it reserves now; return that (-1 if unknown).  A pool is
 * charged to the share it was first seen on (sh: the allocating context's device);
 * afterwards to that one whatever sh says (NULL: a free, a trim). */
static int64_t reconcile_pool(CUmemoryPool pool, struct share *sh)
{
    int64_t reserved;
    if (n_shares == 0 || pool == NULL ||
        !pool_attr(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &reserved))
        return -1;
    pthread_mutex_lock(&tables_lock);
    struct item *it = find(&pools, (uint64_t)(uintptr_t)pool);
    if (it == NULL && sh != NULL) {
        it = insert(&pools, (uint64_t)(uintptr_t)pool);
        if (it)
            it->sh = sh;
    }
    int64_t delta = it ? reserved - it->bytes : 0;
    struct share *owner = it ? it->sh : NULL;
    if (it)
        it->bytes = reserved;
    pthread_mutex_unlock(&tables_lock);
    force_charge(owner, delta);
    return reserved;
}

static void reconcile_all_pools(void)
{
    CUmemoryPool known[64];
    size_t n = 0;
    pthread_mutex_lock(&tables_lock);
    for (size_t i = 0; i < pools.cap && n < 64; i++)
        if (pools.items[i].key)
            known[n++] = (CUmemoryPool)(uintptr_t)pools.items[i].key;
    pthread_mutex_unlock(&tables_lock);
    for (size_t i = 0; i < n; i++)
        reconcile_pool(known[i], NULL);
}

static CUmemoryPool current_pool(void)
{
    CUdevice dev;
    CUmemoryPool pool = NULL;
    if (CALL_REAL(cuCtxGetDevice, (CUdevice *), &dev) != CUDA_SUCCESS ||
        CALL_REAL(cuDeviceGetMemPool, (CUmemoryPool *, CUdevice), &pool, dev) != CUDA_SUCCESS)
        return NULL;
    return pool;
}

/* What the pool reserves now (-1 if unknown) and how much an allocation of
 * `bytes` is expected to grow it. */
static int64_t pool_growth(CUmemoryPool pool, size_t bytes, int64_t *reserved_now)
{
    const int64_t granule = 2 << 20;
    int64_t need = ((int64_t)bytes + granule - 1) / granule * granule;
    int64_t reserved, in_use;
    *reserved_now = -1;
    if (pool && pool_attr(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &reserved) &&
        pool_attr(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &in_use)) {
        need -= reserved - in_use;
        *reserved_now = reserved;
    }
    return need > 0 ? need : 0;
}

typedef CUresult (*alloc_async_fn)(CUdeviceptr *, size_t, CUstream);
typedef CUresult (*alloc_pool_fn)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
typedef CUresult (*free_async_fn)(CUdeviceptr, CUstream);

/*
 * The pool grew past the partition's bytes: give the block back, wait for the
 * stream to reach the free (trimming cannot release a block whose free has not
 * completed), trim the pool to what it held before, and count the truth.  Only
 * ever runs at the edge of the share, so the synchronisation costs nothing in
 * the steady state.  The few milliseconds over are far below the sampler's grace.
 */
static void undo_pool_alloc(CUdeviceptr ptr, CUmemoryPool pool, CUstream stream, int ptsz,
                            int64_t reserved_before)
{
    free_async_fn free_fn = (free_async_fn)real(ptsz ? ID_cuMemFreeAsync_ptsz
                                                     : ID_cuMemFreeAsync);
    if (free_fn != NULL)
        free_fn(ptr, stream);
    CALL_REAL(cuStreamSynchronize, (CUstream),
              (ptsz && stream == NULL) ? CU_STREAM_PER_THREAD : stream);
    CALL_REAL(cuMemPoolTrimTo, (CUmemoryPool, size_t), pool, (size_t)reserved_before);
    reconcile_pool(pool, NULL);
}

static CUresult pool_alloc(int id, CUdeviceptr *dptr, size_t bytes, CUmemoryPool pool,
                           CUstream stream, int from_pool, int ptsz)
{
    void *fn = real(id);
    if (fn == NULL)
        return CUDA_ERROR_NOT_INITIALIZED;
    int counted = n_shares != 0 || guard_floor() >= 0;
    if (!counted)
        return from_pool ? ((alloc_pool_fn)fn)(dptr, bytes, pool, stream)
                         : ((alloc_async_fn)fn)(dptr, bytes, stream);
    if (!from_pool)
        pool = current_pool();
    struct share *sh = current_share();
    int64_t reserved_before;
    int64_t growth = pool_growth(pool, bytes, &reserved_before);
    if (!admit(sh, growth))
        return CUDA_ERROR_OUT_OF_MEMORY; /* never anything else: frameworks retry on 2 */
    CUresult r = from_pool ? ((alloc_pool_fn)fn)(dptr, bytes, pool, stream)
                           : ((alloc_async_fn)fn)(dptr, bytes, stream);
    if (sh == NULL)
        return r;
    /* The truth first, then the estimate back: the count never dips below what the
     * device holds, which the daemon's overhead correction relies on. */
    int64_t reserved_after = reconcile_pool(pool, sh);
    uncharge(sh, growth);
    if (r == CUDA_SUCCESS && reserved_before >= 0 && reserved_after >= 0 &&
        reserved_after - reserved_before > growth &&
        atomic_load(&sh->cap->used_bytes) > allowed_bytes(sh)) {
        undo_pool_alloc(*dptr, pool, stream, ptsz, reserved_before);
        *dptr = 0;
        count_refused(sh);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    return r;
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytes, CUstream stream)
{
    return pool_alloc(ID_cuMemAllocAsync, dptr, bytes, NULL, stream, 0, 0);
}

EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytes, CUstream stream)
{
    return pool_alloc(ID_cuMemAllocAsync_ptsz, dptr, bytes, NULL, stream, 0, 1);
}

EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytes, CUmemoryPool pool,
                                        CUstream stream)
{
    return pool_alloc(ID_cuMemAllocFromPoolAsync, dptr, bytes, pool, stream, 1, 0);
}

EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytes,
                                             CUmemoryPool pool, CUstream stream)
{
    return pool_alloc(ID_cuMemAllocFromPoolAsync_ptsz, dptr, bytes, pool, stream, 1, 1);
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream)
{
    CUresult r = CALL_REAL(cuMemFreeAsync, (CUdeviceptr, CUstream), dptr, stream);
    reconcile_all_pools();
    return r;
}

EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream stream)
{
    CUresult r = CALL_REAL(cuMemFreeAsync_ptsz, (CUdeviceptr, CUstream), dptr, stream);
    reconcile_all_pools();
    return r;
}

EXPORT CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t keep)
{
    CUresult r = CALL_REAL(cuMemPoolTrimTo, (CUmemoryPool, size_t), pool, keep);
    reconcile_pool(pool, NULL);
    return r;
}

EXPORT CUresult cuMemPoolDestroy(CUmemoryPool pool)
{
    CUresult r = CALL_REAL(cuMemPoolDestroy, (CUmemoryPool), pool);
    release_charge(r, &pools, (uint64_t)(uintptr_t)pool);
    return r;
}

/* ------------------------------------------------------------------- VMM */
/*
 * Physical memory of a cuMemCreate handle stays while any mapping of it
 * exists, even after cuMemRelease (JAX releases handles it keeps mapped).  So
 * we charge at create and give back only once the handle is released *and*
 * its last mapping is gone.  vmm_handles: bytes, a = live mappings, b = released.
 * vmm_maps: key = mapped address, bytes = size, a = handle.
 */
EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                            const CUmemAllocationPropHead *prop, unsigned long long flags)
{
    int device = prop != NULL && prop->location_type == CU_MEM_LOCATION_TYPE_DEVICE;
    /* VMM names its device in the request, whatever the current context is. */
    struct share *sh = device ? share_of(prop->location_id) : NULL;
    if (device && !admit(sh, (int64_t)size))
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = CALL_REAL(cuMemCreate, (CUmemGenericAllocationHandle *, size_t,
                                         const CUmemAllocationPropHead *, unsigned long long),
                           handle, size, prop, flags);
    if (device)
        SETTLE_CHARGE(r, &vmm_handles, *handle, (int64_t)size, sh);
    return r;
}

EXPORT CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,
                         CUmemGenericAllocationHandle handle, unsigned long long flags)
{
    CUresult r = CALL_REAL(cuMemMap, (CUdeviceptr, size_t, size_t,
                                      CUmemGenericAllocationHandle, unsigned long long),
                           ptr, size, offset, handle, flags);
    if (r != CUDA_SUCCESS || n_shares == 0)
        return r;
    pthread_mutex_lock(&tables_lock);
    struct item *h = find(&vmm_handles, handle);
    if (h != NULL) {
        h->a++;
        struct item *m = insert(&vmm_maps, ptr);
        if (m) {
            m->bytes = (int64_t)size;
            m->a = (int64_t)handle;
        }
    }
    pthread_mutex_unlock(&tables_lock);
    return r;
}

/* Drop one reference of handle h (under tables_lock); add the bytes now free to
 * freed[] at the index of the share they were charged to. */
static void drop_handle(struct item *h, int64_t freed[CAP_MAX_SHARES])
{
    if (h->a > 0 || !h->b)
        return;
    if (h->sh != NULL)
        freed[h->sh - shares] += h->bytes;
    erase(&vmm_handles, h);
}

/* Outside tables_lock: give each share back what drop_handle freed on it. */
static void uncharge_freed(const int64_t freed[CAP_MAX_SHARES])
{
    for (int k = 0; k < n_shares; k++)
        uncharge(&shares[k], freed[k]);
}

EXPORT CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    CUresult r = CALL_REAL(cuMemUnmap, (CUdeviceptr, size_t), ptr, size);
    if (r != CUDA_SUCCESS || n_shares == 0)
        return r;
    int64_t freed[CAP_MAX_SHARES] = {0};
    pthread_mutex_lock(&tables_lock);
    for (size_t i = 0; i < vmm_maps.cap;) {
        struct item *m = &vmm_maps.items[i];
        if (m->key && m->key >= ptr && m->key < ptr + size) {
            struct item *h = find(&vmm_handles, (uint64_t)m->a);
            erase(&vmm_maps, m); /* may shift a later item into slot i: look again */
            if (h) {
                h->a--;
                drop_handle(h, freed);
            }
            continue;
        }
        i++;
    }
    pthread_mutex_unlock(&tables_lock);
    uncharge_freed(freed);
    return r;
}

EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    CUresult r = CALL_REAL(cuMemRelease, (CUmemGenericAllocationHandle), handle);
    if (r != CUDA_SUCCESS || n_shares == 0)
        return r;
    int64_t freed[CAP_MAX_SHARES] = {0};
    pthread_mutex_lock(&tables_lock);
    struct item *h = find(&vmm_handles, handle);
    if (h) {
        h->b = 1;
        drop_handle(h, freed);
    }
    pthread_mutex_unlock(&tables_lock);
    uncharge_freed(freed);
    return r;
}

/* ---------------------------------------------------------------- arrays */
static int64_t element_bytes(int format)
{
    switch (format) {
    case 0x01: case 0x08: return 1;             /* [UN]SIGNED_INT8 */
    case 0x02: case 0x09: case 0x10: return 2;  /* [UN]SIGNED_INT16, HALF */
    case 0x03: case 0x0a: case 0x20: return 4;  /* [UN]SIGNED_INT32, FLOAT */
    default: return 16;                         /* other formats: an upper bound */
    }
}

static int64_t dim(size_t v) { return v ? (int64_t)v : 1; }

static int64_t array3d_bytes(const CUarray3DDesc *d, unsigned levels)
{
    int64_t total = 0;
    for (unsigned l = 0; l < (levels ? levels : 1); l++) {
        int64_t w = dim(d->width >> l), h = dim(d->height >> l), z = dim(d->depth >> l);
        total += w * h * z * (int64_t)(d->channels ? d->channels : 1) * element_bytes(d->format);
    }
    return total;
}

/* The one admission path of the three array kinds: admit the bytes, make the array
 * through the real driver (`make`, a CALL_REAL expression), and settle the charge on
 * the handle it wrote. A macro, not a function: each real call has its own signature,
 * and the handle may only be read once the driver has said it wrote one. */
#define CREATE_ARRAY(bytes, handle, make)                                           \
    do {                                                                            \
        struct share *sh_ = current_share();                                        \
        if (!admit(sh_, (bytes)))                                                   \
            return CUDA_ERROR_OUT_OF_MEMORY;                                        \
        CUresult r_ = (make);                                                       \
        SETTLE_CHARGE(r_, &arrays, (uint64_t)(uintptr_t)*(handle), (bytes), sh_);   \
        return r_;                                                                  \
    } while (0)

EXPORT CUresult cuArrayCreate_v2(CUarray *array, const CUarrayDesc *desc)
{
    int64_t bytes = desc ? dim(desc->width) * dim(desc->height) *
                               (int64_t)(desc->channels ? desc->channels : 1) *
                               element_bytes(desc->format)
                         : 0;
    CREATE_ARRAY(bytes, array,
                 CALL_REAL(cuArrayCreate_v2, (CUarray *, const CUarrayDesc *), array, desc));
}

EXPORT CUresult cuArray3DCreate_v2(CUarray *array, const CUarray3DDesc *desc)
{
    int64_t bytes = desc ? array3d_bytes(desc, 1) : 0;
    CREATE_ARRAY(bytes, array,
                 CALL_REAL(cuArray3DCreate_v2, (CUarray *, const CUarray3DDesc *), array, desc));
}

EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *array, const CUarray3DDesc *desc,
                                       unsigned levels)
{
    int64_t bytes = desc ? array3d_bytes(desc, levels) : 0;
    CREATE_ARRAY(bytes, array,
                 CALL_REAL(cuMipmappedArrayCreate,
                           (CUmipmappedArray *, const CUarray3DDesc *, unsigned), array, desc,
                           levels));
}

EXPORT CUresult cuArrayDestroy(CUarray array)
{
    CUresult r = CALL_REAL(cuArrayDestroy, (CUarray), array);
    release_charge(r, &arrays, (uint64_t)(uintptr_t)array);
    return r;
}

EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray array)
{
    CUresult r = CALL_REAL(cuMipmappedArrayDestroy, (CUmipmappedArray), array);
    release_charge(r, &arrays, (uint64_t)(uintptr_t)array);
    return r;
}

/* ------------------------------------------------------------- reporting */
EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes)
{
    CUresult r = CALL_REAL(cuMemGetInfo_v2, (size_t *, size_t *), free_bytes, total_bytes);
    if (r != CUDA_SUCCESS || free_bytes == NULL || total_bytes == NULL)
        return r;
    if (n_shares != 0) {
        struct share *sh = current_share();
        if (sh == NULL) { /* a GPU outside the partition: nothing of it is ours */
            *free_bytes = 0;
            return r;
        }
        slot(sh); /* a process that looks at the device will use it: charge its reserve */
        reconcile_all_pools();
        int64_t limit = sh->cap->limit_bytes;
        int64_t left = allowed_bytes(sh) - atomic_load(&sh->cap->used_bytes);
        if (left < 0)
            left = 0;
        if ((int64_t)*free_bytes > left)
            *free_bytes = (size_t)left;
        if ((int64_t)*total_bytes > limit)
            *total_bytes = (size_t)limit;
    } else {
        int64_t floor = guard_floor();
        if (floor >= 0)
            *free_bytes = (int64_t)*free_bytes > floor ? *free_bytes - (size_t)floor : 0;
    }
    return r;
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    CUresult r = CALL_REAL(cuDeviceTotalMem_v2, (size_t *, CUdevice), bytes, dev);
    struct share *sh = r == CUDA_SUCCESS && bytes != NULL ? share_of(dev) : NULL;
    if (sh != NULL && (int64_t)*bytes > sh->cap->limit_bytes)
        *bytes = (size_t)sh->cap->limit_bytes;
    return r;
}

EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version,
                                 unsigned long long flags);
EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version,
                                    unsigned long long flags, int *status);

/* ------------------------------------------------ wrappers, by name */
static void *const WRAPPERS[] = {
#define WRAPPER(fn, base) (void *)fn,
    WRAPPED(WRAPPER)
#undef WRAPPER
};
_Static_assert(sizeof(WRAPPERS) / sizeof(WRAPPERS[0]) == N_WRAPPED, "one wrapper per name");

/* -------------------------------------------------------- cuGetProcAddress */
/*
 * The driver hands out the ABI variant it chooses for (name, version, flags).
 * We substitute our wrapper only when both agree: the name asked for is the
 * wrapped entry's base (or full) name, and the pointer returned is exactly
 * that entry's exported address.  Anything else (another ABI version, an
 * entry point we do not wrap) is returned untouched.
 */
static void substitute(const char *symbol, void **pfn, int version)
{
    if (symbol == NULL || pfn == NULL || *pfn == NULL)
        return;
    int named = 0;
    for (size_t i = 0; i < N_WRAPPED; i++) {
        if (strcmp(BASES[i], symbol) != 0 && strcmp(NAMES[i], symbol) != 0)
            continue;
        named = 1;
        if (*pfn == real((int)i)) {
            *pfn = WRAPPERS[i];
            return;
        }
    }
    /* A modern runtime was handed a variant we do not know (a newer driver ABI):
     * say so once, since those calls now reach the driver uncapped. */
    if (named && version >= 12000 && n_shares != 0) {
        static atomic_flag said = ATOMIC_FLAG_INIT;
        if (!atomic_flag_test_and_set(&said) && getenv("CHRONOS_CAP_QUIET") == NULL)
            fprintf(stderr, "chronos: the driver returned an unknown variant of %s; "
                            "it is not capped at allocation time\n", symbol);
    }
}

EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version,
                                 unsigned long long flags)
{
    CUresult r = CALL_REAL(cuGetProcAddress, (const char *, void **, int, unsigned long long),
                           symbol, pfn, version, flags);
    if (r == CUDA_SUCCESS)
        substitute(symbol, pfn, version);
    return r;
}

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version,
                                    unsigned long long flags, int *status)
{
    CUresult r = CALL_REAL(cuGetProcAddress_v2,
                           (const char *, void **, int, unsigned long long, int *), symbol, pfn,
                           version, flags, status);
    if (r == CUDA_SUCCESS)
        substitute(symbol, pfn, version);
    return r;
}

/* ------------------------------------------------------------------ dlsym */
/* Pure and allocation-free: safe from any dlsym call, at any time. */
static void *wrapper_named(const char *name)
{
    if (name[0] != 'c' || name[1] != 'u')
        return NULL;
    for (size_t i = 0; i < N_WRAPPED; i++)
        if (strcmp(NAMES[i], name) == 0)
            return WRAPPERS[i];
    return NULL;
}

/*
 * dlsym(handle, name) for one of our exact names returns our wrapper, if the
 * real lookup would find the name at all; everything else is forwarded as a
 * tail call (compiled with sibling-call optimisation forced on), so glibc
 * still sees the caller's return address and RTLD_NEXT keeps its meaning.
 */
EXPORT __attribute__((optimize("O2", "optimize-sibling-calls"))) void *
dlsym(void *handle, const char *name)
{
    if (__builtin_expect(real_dlsym == NULL, 0))
        find_real_dlsym(); /* only if another constructor ran before ours */
    void *ours = wrapper_named(name);
    if (ours != NULL) {
        /* RTLD_DEFAULT would find our own export: ask for the object after us. */
        void *where = (handle == RTLD_DEFAULT) ? RTLD_NEXT : handle;
        return real_dlsym(where, name) ? ours : NULL;
    }
    return real_dlsym(handle, name);
}


/* ------------------------------------------------ for the daemon (ctypes) */
/*
 * chronosd sees each process's real footprint in NVML, including the context
 * and modules no hook sees.  When that exceeds what the slot has counted by
 * more than the reserve charged for it (lazily loaded modules grow), raise the
 * slot's overhead to match, so the library stops the process before the
 * sampler would.  Only ever raised, never lowered: the footprint can grow
 * again.  `changes` is the slot's change counter the daemon read *before* its
 * NVML sample: if the process allocated or freed since, NVML and the slot
 * describe different moments (a free between them would read as gigabytes of
 * overhead), so nothing is changed.  Returns the bytes added, 0 if nothing
 * changed, -1 if the file or the process's slot was not found, -2 if the slot
 * moved.  Lock-free like everything else: one CAS on the overhead, then one
 * fetch_add on the partition's counter.
 */
EXPORT long long chronos_cap_raise_overhead(const char *path, long long pid,
                                            unsigned long long start_ticks,
                                            long long seen_bytes, unsigned long long changes)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -1;
    void *map = mmap(NULL, CAP_FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return -1;
    struct cap_header *h = map;
    struct cap_slot *s = (struct cap_slot *)((char *)map + CAP_HEADER_BYTES);
    long long added = -1;
    for (unsigned i = 0; h->magic == CAP_MAGIC && h->version == CAP_VERSION && i < CAP_SLOTS;
         i++) {
        if (atomic_load(&s[i].pid) != (uint64_t)pid ||
            atomic_load(&s[i].start_ticks) != start_ticks)
            continue;
        int64_t overhead = atomic_load(&s[i].overhead);
        int64_t bytes = atomic_load(&s[i].bytes);
        if (atomic_load(&s[i].changes) != changes) {
            added = -2;
            break;
        }
        int64_t wanted = seen_bytes - bytes;
        added = 0;
        if (overhead > 0 && wanted > overhead &&
            atomic_compare_exchange_strong(&s[i].overhead, &overhead, wanted)) {
            atomic_fetch_add(&h->used_bytes, wanted - overhead);
            added = wanted - overhead;
        }
        break;
    }
    munmap(map, CAP_FILE_BYTES);
    return added;
}
