// A hook's start, as musl's posix_spawn does it: clone(CLONE_VM | CLONE_VFORK) on a stack that is a
// local array of the calling thread. glibc's posix_spawn maps a fresh stack for every child and unmaps
// it once the child has exec'd; in a multithreaded process each such unmap makes every core running one
// of its threads flush its TLB (an interprocessor interrupt per core), and a profile of a backlog
// draining put the map and unmap at about 8 % of the daemon's task threads' samples.
//
// The child shares the daemon's memory until it execs, and the calling thread is suspended meanwhile
// (CLONE_VFORK). So the child only makes system calls, and every signal is blocked from before the
// clone until the child's last step: no handler of the daemon's ever runs in it.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "CHookSpawn.h"

struct spawn {
    const char *path;
    char *const *argv;
    char *const *envp;
    int input;
    int output;
    // Written by the child when it fails before or at exec; read by the parent once clone returns.
    volatile int error;
};

// `from` onto `to`, which must not close-on-exec: dup2 clears the flag, except when the two are one
// descriptor already (then it does nothing), so that case clears it itself.
static int place(int from, int to) {
    if (from == to) return fcntl(to, F_SETFD, 0);
    return dup2(from, to) < 0 ? -1 : 0;
}

// Linux's own directory entry, as getdents64 writes it.
struct directory_entry {
    unsigned long long inode;
    long long offset;
    unsigned short length;
    unsigned char type;
    char name[];
};

// Every descriptor from 3 up closed. close_range (Linux 5.9) when the kernel and any seccomp filter
// allow it; else, as glibc does, each descriptor /proc/self/fd lists (read again from its start until it
// lists no other); else every descriptor the limit allows. Raw system calls only: glibc's `close` is a
// cancellation point, which reads the calling thread's state.
static void close_from_3(void) {
#ifdef SYS_close_range
    if (syscall(SYS_close_range, 3U, ~0U, 0U) == 0) return;
#endif
    int directory = (int)syscall(SYS_openat, AT_FDCWD, "/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (directory >= 0) {
        _Alignas(8) char buffer[1024];
        for (;;) {
            long length = syscall(SYS_getdents64, directory, buffer, sizeof buffer);
            if (length <= 0) break;
            int closed = 0;
            for (long at = 0; at < length;) {
                struct directory_entry *entry = (struct directory_entry *)(buffer + at);
                at += entry->length;
                long fd = 0;
                const char *digit = entry->name;
                if (*digit < '0' || *digit > '9') continue;  // "." and ".."
                for (; *digit >= '0' && *digit <= '9'; digit++) fd = fd * 10 + (*digit - '0');
                if (fd >= 3 && fd != directory) {
                    syscall(SYS_close, (int)fd);
                    closed = 1;
                }
            }
            if (closed) syscall(SYS_lseek, directory, 0L, SEEK_SET);
        }
        syscall(SYS_close, directory);
        return;
    }
    struct rlimit limit;
    long last = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY ? (long)limit.rlim_cur : 65536;
    for (long fd = 3; fd < last; fd++) syscall(SYS_close, (int)fd);
}

// The kernel's own `struct sigaction` (x86-64 and arm64 alike): glibc's wrapper refuses its two internal
// signals, and those too must be at their default before the child unblocks them.
struct kernel_sigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};

static int child(void *argument) {
    struct spawn *spawn = argument;
    // Every signal at its default: the daemon ignores some (ignored signals survive exec) and handles
    // others, and none of its handlers may run here, on the daemon's memory.
    struct kernel_sigaction default_action = {SIG_DFL, 0, NULL, 0};
    for (int signal = 1; signal < NSIG; signal++) {
        if (signal != SIGKILL && signal != SIGSTOP) {
            syscall(SYS_rt_sigaction, signal, &default_action, NULL, sizeof default_action.mask);
        }
    }
    unsigned long none = 0;
    if (setpgid(0, 0) != 0) goto failed;
    if (place(spawn->input, 0) != 0 || place(spawn->output, 1) != 0 || place(spawn->output, 2) != 0) goto failed;
    if (chdir("/") != 0) goto failed;
    close_from_3();
    if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof none) != 0) goto failed;
    execve(spawn->path, spawn->argv, spawn->envp);
failed:
    spawn->error = errno;
    _exit(127);
}

int payop_spawn_hook(pid_t *pid, const char *path, char *const argv[], char *const envp[], int input, int output) {
    // The child's stack: it makes a few dozen system calls; glibc's lazy binding of a first call may
    // save the vector registers on it, which takes a few KB at most.
    _Alignas(16) char stack[32768];
    struct spawn spawn = {path, argv, envp, input, output, 0};
    // Every signal, glibc's own two included (its sigfillset leaves them out): raw, as glibc's spawn does.
    // But SIGCHLD while it is at its default, ignored (the daemon leaves it so): an earlier hook's exit,
    // which signals the thread that started it, is then dropped by the kernel at once. Blocked here, it
    // would be queued for the one thread that does not block it (the main thread) and wake that thread
    // and libdispatch's manager, whose signalfd every signal wakes, for nothing; and this thread spends
    // much of a backlog here. A signal at its default runs no handler, in the child neither. (Should a
    // handler be installed between this check and the child's reset, it could run in the child only for a
    // SIGCHLD sent to the child itself or its process group in those few system calls.)
    unsigned long all = ~0UL, previous = 0;
    struct kernel_sigaction child_signal;
    if (syscall(SYS_rt_sigaction, SIGCHLD, NULL, &child_signal, sizeof child_signal.mask) == 0 &&
        child_signal.handler == SIG_DFL) {
        all &= ~(1UL << (SIGCHLD - 1));
    }
    syscall(SYS_rt_sigprocmask, SIG_BLOCK, &all, &previous, sizeof all);
    pid_t started = clone(child, stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD, &spawn);
    int error = started < 0 ? errno : spawn.error;
    if (started > 0 && error != 0) {
        while (syscall(SYS_wait4, started, NULL, 0, NULL) < 0 && errno == EINTR) {}
    }
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &previous, NULL, sizeof previous);
    if (error != 0) return error;
    *pid = started;
    return 0;
}
