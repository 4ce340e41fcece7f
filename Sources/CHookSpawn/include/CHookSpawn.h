#ifndef PAYOP_IPND_CHOOKSPAWN_H
#define PAYOP_IPND_CHOOKSPAWN_H

#include <sys/types.h>

/// Starts the program at `path` (absolute) with `argv` and `envp` (NULL-terminated) as its whole
/// arguments and environment: in a process group of its own, in `/`, with `input` as its stdin and
/// `output` as its stdout and stderr, no other descriptor, every signal at its default and none
/// blocked. What glibc's `posix_spawn` does with those attributes, without the stack it maps and
/// unmaps for every child (see `HookSpawn.c`).
///
/// Returns 0 and the child's id in `*pid`, or the errno that kept the program from starting (then no
/// child is left behind).
int payop_spawn_hook(pid_t *pid, const char *path, char *const argv[], char *const envp[], int input, int output);

#endif
