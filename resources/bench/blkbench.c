/*
 * blkbench: O_DIRECT read benchmark.
 * The same binary runs inside the guests (against /dev/vda) and on the host
 * (against the image file), so the numbers compare like with like.
 *
 *   blkbench PATH randread|seqread SECONDS [QUEUE_DEPTH]
 * prints: blkbench mode=<m> qd=<d> ops=<n> bytes=<b> secs=<s> iops=<i> mib_s=<t>
 *
 * Queue depth 1 (the default) is a loop of synchronous preads. A deeper
 * queue uses Linux native AIO (io_setup/io_submit/io_getevents) through raw
 * syscall(2), since the binary is linked statically without libaio: QD
 * requests are submitted, and each completion is replaced at once by a new
 * request, so QD requests are in flight all the time. Random offsets come
 * from the same xorshift sequence at every depth.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 256

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

struct gen {
    int rand;
    uint64_t blocks, bs, x, n;
};

/* The offset of the next request. */
static uint64_t next_off(struct gen *g) {
    uint64_t block;
    if (g->rand) {
        g->x ^= g->x << 13;
        g->x ^= g->x >> 7;
        g->x ^= g->x << 17;
        block = g->x % g->blocks;
    } else {
        block = g->n % g->blocks;
    }
    g->n++;
    return block * g->bs;
}

/* Queue depth 1: synchronous preads; returns the number of reads done. */
static int run_sync(int fd, struct gen *g, double secs, uint64_t *ops, double *el) {
    void *buf;
    if (posix_memalign(&buf, 4096, g->bs) != 0) {
        return -1;
    }
    double start = now(), end = start + secs, t = start;
    while (t < end) {
        for (int i = 0; i < 16; i++) {
            if (pread(fd, buf, g->bs, next_off(g)) != (ssize_t)g->bs) {
                perror("blkbench: pread");
                return -1;
            }
            ++*ops;
        }
        t = now();
    }
    *el = t - start;
    return 0;
}

/* Queue depth qd > 1: native AIO, qd requests in flight. */
static int run_aio(int fd, struct gen *g, int qd, double secs, uint64_t *ops, double *el) {
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, qd, &ctx) != 0) {
        perror("blkbench: io_setup");
        return -1;
    }
    static struct iocb cbs[MAX_QD];
    static struct io_event evs[MAX_QD];
    struct iocb *list[MAX_QD];
    char *bufs;
    if (posix_memalign((void **)&bufs, 4096, (size_t)qd * g->bs) != 0) {
        return -1;
    }
    for (int i = 0; i < qd; i++) {
        memset(&cbs[i], 0, sizeof cbs[i]);
        cbs[i].aio_data = (uint64_t)i;
        cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[i].aio_fildes = (uint32_t)fd;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)i * g->bs);
        cbs[i].aio_nbytes = g->bs;
        cbs[i].aio_offset = (int64_t)next_off(g);
        list[i] = &cbs[i];
    }
    double start = now(), end = start + secs, t = start;
    long pending = qd, inflight = 0;
    int stop = 0;
    for (;;) {
        /* Submit what is pending (the start, or the last completions). */
        long done = 0;
        while (done < pending) {
            long r = syscall(SYS_io_submit, ctx, pending - done, list + done);
            if (r <= 0) {
                perror("blkbench: io_submit");
                return -1;
            }
            done += r;
        }
        inflight += pending;
        pending = 0;
        if (inflight == 0) {
            break;
        }
        long n = syscall(SYS_io_getevents, ctx, 1, (long)qd, evs, NULL);
        if (n < 0) {
            perror("blkbench: io_getevents");
            return -1;
        }
        inflight -= n;
        for (long i = 0; i < n; i++) {
            if (evs[i].res != (int64_t)g->bs) {
                fprintf(stderr, "blkbench: aio read returned %lld\n", (long long)evs[i].res);
                return -1;
            }
            ++*ops;
            if (!stop) {
                struct iocb *cb = &cbs[evs[i].data];
                cb->aio_offset = (int64_t)next_off(g);
                list[pending++] = cb;
            }
        }
        t = now();
        if (!stop && t >= end) {
            /* Stop submitting; reap what is still in flight (counted, as
             * the time it takes is counted too). */
            stop = 1;
            pending = 0;
        }
    }
    t = now();
    *el = t - start;
    syscall(SYS_io_destroy, ctx);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: blkbench PATH randread|seqread SECONDS [QUEUE_DEPTH]\n");
        return 2;
    }
    int rand = strcmp(argv[2], "randread") == 0;
    if (!rand && strcmp(argv[2], "seqread") != 0) {
        fprintf(stderr, "blkbench: unknown mode %s\n", argv[2]);
        return 2;
    }
    double secs = atof(argv[3]);
    int qd = argc == 5 ? atoi(argv[4]) : 1;
    if (qd < 1 || qd > MAX_QD) {
        fprintf(stderr, "blkbench: queue depth must be 1..%d\n", MAX_QD);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror("blkbench: open");
        return 1;
    }
    uint64_t size = 0;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
        ioctl(fd, BLKGETSIZE64, &size);
    } else {
        size = st.st_size;
    }
    struct gen g = {.rand = rand, .bs = rand ? 4096 : 1 << 20, .x = 0x9e3779b97f4a7c15ull};
    if (size < 2 * g.bs) {
        fprintf(stderr, "blkbench: %s is too small\n", argv[1]);
        return 1;
    }
    g.blocks = size / g.bs;
    uint64_t ops = 0;
    double el = 0;
    int r = qd == 1 ? run_sync(fd, &g, secs, &ops, &el) : run_aio(fd, &g, qd, secs, &ops, &el);
    if (r != 0) {
        return 1;
    }
    printf("blkbench mode=%s qd=%d ops=%llu bytes=%llu secs=%.3f iops=%.0f mib_s=%.1f\n", argv[2], qd,
           (unsigned long long)ops, (unsigned long long)(ops * g.bs), el, ops / el,
           ops * g.bs / el / 1048576.0);
    return 0;
}
