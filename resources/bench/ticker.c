/* ticker: the Linux test guest's clock-driven heartbeat for the migration
 * benchmark (resources/bench/migrate.sh, abide.test=ticker).
 *
 * Usage: ticker PERIOD_MS [DIRTY_MIB_PER_S BUFFER_MIB]
 *
 * Prints "abide-linux: tick n=N" every PERIOD_MS of CLOCK_MONOTONIC,
 * sleeping in between, so an otherwise idle guest shows on its console
 * when it was stopped: the host timestamps the lines, and the longest gap
 * minus the period is the pause as the guest lived it. With a dirty rate,
 * it first fills BUFFER_MIB of memory with non-zero data, then at every
 * tick writes one word into each of the next DIRTY_MIB_PER_S * PERIOD_MS /
 * 1000 MiB of 4 KiB pages, cycling through the buffer: the guest dirties
 * memory at a fixed rate. Static, no libc beyond stdio/time.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv)
{
    if (argc != 2 && argc != 4) {
        fprintf(stderr, "usage: ticker PERIOD_MS [DIRTY_MIB_PER_S BUFFER_MIB]\n");
        return 2;
    }
    long period_ms = atol(argv[1]);
    long rate = argc == 4 ? atol(argv[2]) : 0;
    long buf_mib = argc == 4 ? atol(argv[3]) : 0;
    if (period_ms <= 0 || rate < 0 || buf_mib < 0 || (rate > 0 && buf_mib == 0)) {
        fprintf(stderr, "ticker: bad arguments\n");
        return 2;
    }
    size_t pages = (size_t)buf_mib * 256;
    uint64_t *buf = NULL;
    if (pages) {
        buf = malloc(pages * 4096);
        if (!buf) {
            fprintf(stderr, "ticker: cannot allocate %ld MiB\n", buf_mib);
            return 1;
        }
        memset(buf, 0x5a, pages * 4096);
    }
    /* Pages per tick; at least one when dirtying at all. */
    size_t per_tick = (size_t)(rate * 256 * period_ms / 1000);
    if (rate > 0 && per_tick == 0)
        per_tick = 1;
    printf("abide-linux: ticker-ready period_ms=%ld dirty_mib_s=%ld buffer_mib=%ld\n",
           period_ms, rate, buf_mib);
    fflush(stdout);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    size_t at = 0;
    for (uint64_t n = 1;; n++) {
        next.tv_nsec += period_ms * 1000000L;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        for (size_t i = 0; i < per_tick; i++) {
            buf[at * 512] = n;
            at = (at + 1) % pages;
        }
        printf("abide-linux: tick n=%llu\n", (unsigned long long)n);
        fflush(stdout);
    }
}
