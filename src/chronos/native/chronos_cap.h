/*
 * The accounting file shared by every process of one partition on one GPU (see
 * docs/ALLOCATION_CAP.md).  src/chronos/alloccap.py reads and writes the same
 * layout with struct offsets; change both together and bump CAP_VERSION.
 *
 * Every counter is a 64-bit atomic updated with fetch_add/CAS only: no lock
 * is ever held across processes, so a process killed at any instruction can
 * leave at most one allocation's bytes counted (never a held lock).
 */
#ifndef CHRONOS_CAP_H
#define CHRONOS_CAP_H

#include <stdint.h>

#define CAP_MAGIC 0x43415043u /* the bytes "CPAC" on disk (little-endian) */
#define CAP_VERSION 3u
#define CAP_SLOTS 256u
#define CAP_HEADER_BYTES 128u
#define CAP_SLOT_BYTES 40u
#define CAP_FILE_BYTES (CAP_HEADER_BYTES + CAP_SLOTS * CAP_SLOT_BYTES)
#define CAP_SLOT_RECLAIMING UINT64_MAX
#define CAP_MAX_SHARES 16u /* GPUs of one partition a process can be capped on */

struct cap_slot {          /* one process that has touched the device */
    uint64_t pid;          /* 0 = free; CAS-claimed; CAP_SLOT_RECLAIMING while freed */
    uint64_t start_ticks;  /* /proc/<pid>/stat field 22: tells a reused pid apart */
    int64_t bytes;         /* bytes of allocations this process holds */
    int64_t overhead;      /* context/module reserve charged for it (daemon may correct) */
    uint64_t changes;      /* bumped at every change of bytes: the daemon uses an NVML
                              sample only if this did not move around it */
};

struct cap_header {
    uint32_t magic;
    uint32_t version;
    int64_t limit_bytes;    /* the partition's bytes: the cap and the reported total */
    int64_t reserve_bytes;  /* charged per process at its first device call */
    int64_t used_bytes;     /* sum of every slot's bytes + overhead (the one counter) */
    uint32_t slots;         /* CAP_SLOTS */
    uint32_t flags;
    int64_t refused;        /* allocations refused so far (for `chronos stats`) */
    int64_t margin_bytes;   /* kept free below the limit: memory the driver takes on its
                               own (lazily loaded kernels, pool rounding) after a fill */
    uint8_t pad[8];
    char device_uuid[64];   /* the GPU this file counts ("GPU-..."/"MIG-...", NUL-ended);
                               empty: the file's position among the partition's files
                               is the CUDA ordinal it counts (backends without UUIDs) */
};

_Static_assert(sizeof(struct cap_header) == CAP_HEADER_BYTES, "header layout");
_Static_assert(sizeof(struct cap_slot) == CAP_SLOT_BYTES, "slot layout");

#endif
