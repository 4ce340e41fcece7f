/* A command hook for bench/fanout.sh: appends "<transaction id> <unix time in ns>" the moment it
 * starts, so the bench can measure IPN received -> hook process started. Built by the bench script. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    const char *id = getenv("PAYOP_TRANSACTION_ID");
    const char *path = getenv("PAYOP_HOOK_NAME"); /* unused; the log path is argv-free by design */
    (void)path;
    FILE *log = fopen(BENCH_LOG, "a");
    if (!log) return 1;
    fprintf(log, "%s %lld\n", id ? id : "-", (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    fclose(log);
    return 0;
}
