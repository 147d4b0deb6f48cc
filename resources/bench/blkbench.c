/*
 * blkbench: synchronous (queue depth 1) O_DIRECT read benchmark.
 * The same binary runs inside the guests (against /dev/vda) and on the host
 * (against the image file), so the numbers compare like with like.
 *
 *   blkbench PATH randread|seqread SECONDS
 * prints: blkbench mode=<m> ops=<n> bytes=<b> secs=<s> iops=<i> mib_s=<t>
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: blkbench PATH randread|seqread SECONDS\n");
        return 2;
    }
    int rand = strcmp(argv[2], "randread") == 0;
    if (!rand && strcmp(argv[2], "seqread") != 0) {
        fprintf(stderr, "blkbench: unknown mode %s\n", argv[2]);
        return 2;
    }
    double secs = atof(argv[3]);
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
    size_t bs = rand ? 4096 : 1 << 20;
    if (size < 2 * bs) {
        fprintf(stderr, "blkbench: %s is too small\n", argv[1]);
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, bs) != 0) {
        return 1;
    }
    uint64_t blocks = size / bs, x = 0x9e3779b97f4a7c15ull, ops = 0, off = 0;
    double start = now(), end = start + secs, t = start;
    while (t < end) {
        for (int i = 0; i < 16; i++) {
            if (rand) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                off = (x % blocks) * bs;
            } else {
                off = (ops % blocks) * bs;
            }
            if (pread(fd, buf, bs, off) != (ssize_t)bs) {
                perror("blkbench: pread");
                return 1;
            }
            ops++;
        }
        t = now();
    }
    double el = t - start;
    printf("blkbench mode=%s ops=%llu bytes=%llu secs=%.3f iops=%.0f mib_s=%.1f\n", argv[2],
           (unsigned long long)ops, (unsigned long long)(ops * bs), el, ops / el,
           ops * bs / el / 1048576.0);
    return 0;
}
