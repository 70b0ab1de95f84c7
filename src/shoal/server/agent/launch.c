/* `shoal-agent --host-launch NETNS ROOTFS MOUNTPOINT NOFILE -- PROGRAM ARGS...`: run on the HOST
 * (never in a sandbox) by the runc host, in place of a Python preexec_fn, to start `runc run` for
 * a sandbox with a user namespace (host/runc.py). A preexec_fn makes Python fork the whole server
 * (~19 ms at 100 MB) where a plain spawn is a vfork (~1 ms); this does the same steps in a small
 * static process, then execs PROGRAM:
 *
 *   RLIMIT_NOFILE = NOFILE (runc, in the user namespace, cannot set it: the sandbox inherits it);
 *   join the network namespace NETNS ("-" for none): runc cannot from inside the user namespace;
 *   a private mount namespace with ROOTFS bound at MOUNTPOINT (the sandbox's root cannot walk
 *   the 0700 home to ROOTFS) and, with a network namespace, sysfs mounted read-only on its /sys
 *   (made if the image has none; left alone if it is not a directory).
 *
 * Any failure: one line on stderr (runc's log) and exit 125, so `runc run` reads as failed. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

static int fail(const char *what, const char *arg)
{
    fprintf(stderr, "shoal-agent --host-launch: %s %s: %s\n", what, arg, strerror(errno));
    return 125;
}

int host_launch(int argc, char **argv)
{
    /* argv[0] --host-launch NETNS ROOTFS MOUNTPOINT NOFILE -- PROGRAM ... */
    if (argc < 8 || strcmp(argv[6], "--")) {
        fprintf(stderr, "usage: shoal-agent --host-launch NETNS ROOTFS MOUNTPOINT NOFILE -- PROGRAM...\n");
        return 125;
    }
    const char *netns = argv[2], *rootfs = argv[3], *point = argv[4];
    char *end;
    errno = 0;
    unsigned long long nofile = strtoull(argv[5], &end, 10);
    if (errno || *end || !nofile)
        return fail("bad NOFILE", argv[5]);
    struct rlimit rl = {nofile, nofile};
    if (setrlimit(RLIMIT_NOFILE, &rl))
        return fail("setrlimit", argv[5]);
    bool with_net = strcmp(netns, "-") != 0;
    if (with_net) {
        int fd = open(netns, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || setns(fd, CLONE_NEWNET))
            return fail("joining the network namespace", netns);
        close(fd);
    }
    if (unshare(CLONE_NEWNS))
        return fail("unshare", "CLONE_NEWNS");
    if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL))
        return fail("making mounts private", "/");
    if (mount(rootfs, point, NULL, MS_BIND, NULL))
        return fail("binding", rootfs);
    if (with_net) {
        char sys[4096];
        if (snprintf(sys, sizeof sys, "%s/sys", point) >= (int)sizeof sys)
            return fail("path too long", point);
        if (mkdir(sys, 0555) && errno != EEXIST)
            return fail("mkdir", sys);
        struct stat st;
        if (lstat(sys, &st))
            return fail("lstat", sys);
        if (S_ISDIR(st.st_mode) &&
            mount("sysfs", sys, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
            return fail("mounting sysfs on", sys);
    }
    execvp(argv[7], argv + 7);
    return fail("exec", argv[7]);
}
