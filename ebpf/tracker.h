/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one definition of everything the kernel programs share with user space:
 * map names, map key/value layouts, the event record and its codes.
 *
 * User space (agent/build.rs) reads the `#define BF_*` lines of this file and
 * generates Rust constants from them, so layouts are written down once. Every
 * offset below is checked against the C structs with _Static_assert when the
 * programs are compiled; a change here that forgets an offset fails the build.
 * Only plain integer #defines may appear (build.rs parses them).
 */
#ifndef BLOCKFERRY_TRACKER_H
#define BLOCKFERRY_TRACKER_H

/* Map names as they appear in the object file. */
#define BF_MAP_EVENTS "bf_events"       /* BPF_MAP_TYPE_RINGBUF of struct bf_event */
#define BF_MAP_PROTECTED "bf_protected" /* HASH: __u32 kernel dev_t -> struct bf_protect */
#define BF_MAP_DROPS "bf_drops"         /* HASH: __u32 kernel dev_t -> __u64 failed reserves */
#define BF_MAP_KCONSTS "bf_kconsts"     /* ARRAY: index BF_KC_* -> __u64 resolved enum value */
/* Written by user space only, pinned with the rest so a restarted agent finds them: */
#define BF_MAP_SEEN "bf_seen"   /* HASH: __u32 kernel dev_t -> __u64 drops user space accounted for */
#define BF_MAP_BUILD "bf_build" /* ARRAY[1]: __u64 id of the object that created the pins */

/* Ring buffer size in bytes (power of two, multiple of the page size). */
#define BF_RINGBUF_BYTES 4194304
/* Wakeups: a record does not wake user space until the ring holds
 * 1/BF_WAKEUP_DIVISOR of its size; user space drains every BF_POLL_MS anyway.
 * A wakeup per write costs the writer more than the tracking itself. */
#define BF_WAKEUP_DIVISOR 8
#define BF_POLL_MS 10
/* Maximum number of protected whole disks at once. */
#define BF_MAX_DISKS 256
/* Sector ranges per whole disk (several partitions of one disk may be protected). */
#define BF_MAX_RANGES 8

/*
 * struct bf_protect: BF_MAX_RANGES pairs of [start, end) sectors of the whole
 * disk, absolute (partition offset included). Unused pairs are 0, 0 and never
 * match. A whole disk is 0, BF_SECTOR_END.
 */
#define BF_PROTECT_BYTES 128
#define BF_SECTOR_END 0xffffffffffffffff

/* Event phases. */
#define BF_PHASE_SUBMIT 1   /* tp_btf/block_bio_queue: a bio entered the block layer */
#define BF_PHASE_COMPLETE 2 /* block_rq_complete / block_bio_complete: data reached the device */

/* Event operations: blockferry's own stable codes, decoded in the kernel from
 * the running kernel's enum req_op with CO-RE (the kernel's numbers move). */
#define BF_OP_WRITE 1
#define BF_OP_WRITE_ZEROES 2
#define BF_OP_DISCARD 3
#define BF_OP_SECURE_ERASE 4
#define BF_OP_FLUSH 5

/* Event flag bits, decoded from enum req_flag_bits with CO-RE. */
#define BF_FLAG_PREFLUSH 1
#define BF_FLAG_FUA 2
#define BF_FLAG_NOUNMAP 4

/* struct bf_event layout, little endian as the host. */
#define BF_EVENT_BYTES 24
#define BF_EV_OFF_SECTOR 0 /* __u64 absolute sector on the whole disk */
#define BF_EV_OFF_BYTES 8  /* __u32 length in bytes (0 for a flush) */
#define BF_EV_OFF_DEV 12   /* __u32 kernel dev_t (major << 20 | minor) of the whole disk */
#define BF_EV_OFF_OP 16    /* __u8 BF_OP_* */
#define BF_EV_OFF_PHASE 17 /* __u8 BF_PHASE_* */
#define BF_EV_OFF_FLAGS 18 /* __u16 BF_FLAG_* */
#define BF_EV_OFF_CPU 20   /* __u32 cpu that saw the event (diagnostics) */

/* Indexes of bf_kconsts: the enum values CO-RE resolved on the running kernel,
 * filled by the bf_kconsts_fill program run once with BPF_PROG_TEST_RUN.
 * A value of BF_KC_MISSING means the enumerator does not exist on this kernel. */
#define BF_KC_REQ_OP_WRITE 0
#define BF_KC_REQ_OP_FLUSH 1
#define BF_KC_REQ_OP_DISCARD 2
#define BF_KC_REQ_OP_SECURE_ERASE 3
#define BF_KC_REQ_OP_WRITE_ZEROES 4
#define BF_KC_REQ_OP_ZONE_APPEND 5
#define BF_KC_REQ_OP_BITS 6
#define BF_KC_REQ_PREFLUSH 7
#define BF_KC_REQ_FUA 8
#define BF_KC_REQ_NOUNMAP 9
#define BF_KC_COUNT 10
#define BF_KC_MISSING 0xffffffff

#ifdef __BPF__
struct bf_protect {
	__u64 range[BF_MAX_RANGES][2];
};

struct bf_event {
	__u64 sector;
	__u32 bytes;
	__u32 dev;
	__u8 op;
	__u8 phase;
	__u16 flags;
	__u32 cpu;
};

_Static_assert(sizeof(struct bf_protect) == BF_PROTECT_BYTES, "bf_protect size");
_Static_assert(sizeof(struct bf_event) == BF_EVENT_BYTES, "bf_event size");
_Static_assert(__builtin_offsetof(struct bf_event, sector) == BF_EV_OFF_SECTOR, "sector");
_Static_assert(__builtin_offsetof(struct bf_event, bytes) == BF_EV_OFF_BYTES, "bytes");
_Static_assert(__builtin_offsetof(struct bf_event, dev) == BF_EV_OFF_DEV, "dev");
_Static_assert(__builtin_offsetof(struct bf_event, op) == BF_EV_OFF_OP, "op");
_Static_assert(__builtin_offsetof(struct bf_event, phase) == BF_EV_OFF_PHASE, "phase");
_Static_assert(__builtin_offsetof(struct bf_event, flags) == BF_EV_OFF_FLAGS, "flags");
_Static_assert(__builtin_offsetof(struct bf_event, cpu) == BF_EV_OFF_CPU, "cpu");
#endif

#endif /* BLOCKFERRY_TRACKER_H */
