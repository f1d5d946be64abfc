// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * blockferry change tracker: records which byte ranges of protected disks are
 * written, at submission and again at completion.
 *
 * Why both: a range is clean only once every write to it that was submitted
 * before the agent read it has completed. The submission event makes the agent
 * read the range; the completion event marks it dirty again, so a read that
 * raced with a write still in flight is repeated after the write landed.
 *
 * Ops and flags are decoded from the running kernel's enums with CO-RE: their
 * numbers have moved between kernels and will move again.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "tracker.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, BF_RINGBUF_BYTES);
} bf_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BF_MAX_DISKS);
	__type(key, __u32);
	__type(value, struct bf_protect);
} bf_protected SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BF_MAX_DISKS);
	__type(key, __u32);
	__type(value, __u64);
} bf_drops SEC(".maps");

/* Never touched by the programs: they exist so that, pinned, they carry the
 * agent's bookkeeping across restarts (see agent/src/tracker/pin.rs). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BF_MAX_DISKS);
	__type(key, __u32);
	__type(value, __u64);
} bf_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bf_build SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BF_KC_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} bf_kconsts SEC(".maps");

/* REQ_OP_BITS is a #define, invisible to BTF; the first flag bit is defined
 * as REQ_OP_BITS in enum req_flag_bits, so the op mask follows from it. */
static __always_inline __u32 req_op_of(__u64 opf)
{
	__u32 op_bits = bpf_core_enum_value(enum req_flag_bits, __REQ_FAILFAST_DEV);

	return opf & ((1u << (op_bits & 31)) - 1);
}

static __always_inline __u8 bf_op_of(__u32 op)
{
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_WRITE))
		return BF_OP_WRITE;
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_WRITE_ZEROES))
		return BF_OP_WRITE_ZEROES;
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_DISCARD))
		return BF_OP_DISCARD;
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_SECURE_ERASE))
		return BF_OP_SECURE_ERASE;
	if (bpf_core_enum_value_exists(enum req_op, REQ_OP_ZONE_APPEND) &&
	    op == bpf_core_enum_value(enum req_op, REQ_OP_ZONE_APPEND))
		return BF_OP_WRITE;
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_FLUSH))
		return BF_OP_FLUSH;
	return 0;
}

static __always_inline __u16 bf_flags_of(__u64 opf)
{
	__u16 flags = 0;

	if (opf & (1ull << bpf_core_enum_value(enum req_flag_bits, __REQ_PREFLUSH)))
		flags |= BF_FLAG_PREFLUSH;
	if (opf & (1ull << bpf_core_enum_value(enum req_flag_bits, __REQ_FUA)))
		flags |= BF_FLAG_FUA;
	if (opf & (1ull << bpf_core_enum_value(enum req_flag_bits, __REQ_NOUNMAP)))
		flags |= BF_FLAG_NOUNMAP;
	return flags;
}

/* Is [sector, sector + bytes) on a protected range of disk `dev`? A flush
 * (bytes == 0) matters to every protected disk it is sent to. */
static __always_inline bool protected_range(__u32 dev, __u64 sector, __u32 bytes)
{
	struct bf_protect *p = bpf_map_lookup_elem(&bf_protected, &dev);
	__u64 end = sector + (bytes >> 9) + ((bytes & 511) ? 1 : 0);

	if (!p)
		return false;
	for (int i = 0; i < BF_MAX_RANGES; i++) {
		__u64 rs = p->range[i][0], re = p->range[i][1];

		if (rs >= re)
			continue;
		if (bytes == 0 || (sector < re && end > rs))
			return true;
	}
	return false;
}

/* Batch wakeups: waking the agent for every record makes the writer pay a
 * context switch per write; it drains on a timer and is woken early only when
 * the ring fills up (see BF_WAKEUP_DIVISOR). */
static __always_inline __u64 wakeup_flag(void)
{
	__u64 avail = bpf_ringbuf_query(&bf_events, BPF_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(&bf_events, BPF_RB_RING_SIZE);

	return avail >= size / BF_WAKEUP_DIVISOR ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

static __always_inline void emit(__u32 dev, __u64 sector, __u32 bytes, __u8 op, __u8 phase,
				 __u16 flags)
{
	struct bf_event *e = bpf_ringbuf_reserve(&bf_events, sizeof(*e), 0);

	if (!e) {
		/* A lost event is a lost write unless user space hears about it:
		 * count it per disk; the agent turns any count into a resync. */
		__u64 *drops = bpf_map_lookup_elem(&bf_drops, &dev);

		if (drops)
			__sync_fetch_and_add(drops, 1);
		return;
	}
	e->sector = sector;
	e->bytes = bytes;
	e->dev = dev;
	e->op = op;
	e->phase = phase;
	e->flags = flags;
	e->cpu = bpf_get_smp_processor_id();
	bpf_ringbuf_submit(e, wakeup_flag());
}

/* Every bio, for request-based and bio-based disks alike, with the whole-disk
 * device and the absolute sector (a partition's offset is already added). */
SEC("tp_btf/block_bio_queue")
int BPF_PROG(bf_bio_queue, struct bio *bio)
{
	__u64 opf = bio->bi_opf;
	__u8 op = bf_op_of(req_op_of(opf));
	__u32 bytes, dev;
	__u64 sector;
	__u16 flags;

	if (!op)
		return 0;
	bytes = bio->bi_iter.bi_size;
	sector = bio->bi_iter.bi_sector;
	dev = bio->bi_bdev->bd_disk->part0->bd_dev;
	flags = bf_flags_of(opf);
	/* The empty PREFLUSH write of fsync is a barrier, not data. */
	if (op == BF_OP_WRITE && bytes == 0) {
		if (!(flags & BF_FLAG_PREFLUSH))
			return 0;
		op = BF_OP_FLUSH;
	}
	if (!protected_range(dev, sector, bytes))
		return 0;
	emit(dev, sector, bytes, op, BF_PHASE_SUBMIT, flags);
	return 0;
}

/* Completion on request-based disks (loop, virtio, nvme, scsi). Fires per
 * completed part of a request: `nr_bytes` from the request's current sector. */
SEC("tp_btf/block_rq_complete")
int BPF_PROG(bf_rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	__u64 opf = rq->cmd_flags;
	__u8 op = bf_op_of(req_op_of(opf));
	__u64 sector;
	__u32 dev;

	/* Flushes are barriers at submission; their completion carries no range. */
	if (!op || op == BF_OP_FLUSH || nr_bytes == 0)
		return 0;
	sector = rq->__sector;
	dev = rq->q->disk->part0->bd_dev;
	if (!protected_range(dev, sector, nr_bytes))
		return 0;
	emit(dev, sector, nr_bytes, op, BF_PHASE_COMPLETE, bf_flags_of(opf));
	return 0;
}

/* Completion on bio-based disks (zram, device-mapper, md): blk-mq clears the
 * bio's trace-completion flag because block_rq_complete already covered it,
 * so this fires only where no request exists. See ebpf/README.md. */
SEC("tp_btf/block_bio_complete")
int BPF_PROG(bf_bio_complete, struct request_queue *q, struct bio *bio)
{
	__u64 opf = bio->bi_opf;
	__u8 op = bf_op_of(req_op_of(opf));
	__u32 bytes, dev;
	__u64 sector;

	if (!op || op == BF_OP_FLUSH)
		return 0;
	bytes = bio->bi_iter.bi_size;
	if (bytes == 0)
		return 0;
	sector = bio->bi_iter.bi_sector;
	dev = bio->bi_bdev->bd_disk->part0->bd_dev;
	if (!protected_range(dev, sector, bytes))
		return 0;
	emit(dev, sector, bytes, op, BF_PHASE_COMPLETE, bf_flags_of(opf));
	return 0;
}

static __always_inline void kc_set(__u32 idx, __u64 val)
{
	bpf_map_update_elem(&bf_kconsts, &idx, &val, BPF_ANY);
}

/* Never attached: user space runs it once with BPF_PROG_TEST_RUN to learn what
 * CO-RE resolved on this kernel (`blockferry-agent probe` prints it). */
SEC("raw_tp")
int bf_kconsts_fill(void *ctx)
{
	kc_set(BF_KC_REQ_OP_WRITE, bpf_core_enum_value(enum req_op, REQ_OP_WRITE));
	kc_set(BF_KC_REQ_OP_FLUSH, bpf_core_enum_value(enum req_op, REQ_OP_FLUSH));
	kc_set(BF_KC_REQ_OP_DISCARD, bpf_core_enum_value(enum req_op, REQ_OP_DISCARD));
	kc_set(BF_KC_REQ_OP_SECURE_ERASE, bpf_core_enum_value(enum req_op, REQ_OP_SECURE_ERASE));
	kc_set(BF_KC_REQ_OP_WRITE_ZEROES, bpf_core_enum_value(enum req_op, REQ_OP_WRITE_ZEROES));
	if (bpf_core_enum_value_exists(enum req_op, REQ_OP_ZONE_APPEND))
		kc_set(BF_KC_REQ_OP_ZONE_APPEND,
		       bpf_core_enum_value(enum req_op, REQ_OP_ZONE_APPEND));
	else
		kc_set(BF_KC_REQ_OP_ZONE_APPEND, BF_KC_MISSING);
	kc_set(BF_KC_REQ_OP_BITS, bpf_core_enum_value(enum req_flag_bits, __REQ_FAILFAST_DEV));
	kc_set(BF_KC_REQ_PREFLUSH, bpf_core_enum_value(enum req_flag_bits, __REQ_PREFLUSH));
	kc_set(BF_KC_REQ_FUA, bpf_core_enum_value(enum req_flag_bits, __REQ_FUA));
	kc_set(BF_KC_REQ_NOUNMAP, bpf_core_enum_value(enum req_flag_bits, __REQ_NOUNMAP));
	return 0;
}
