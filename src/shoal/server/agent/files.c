/* shoal-agent: files, handles, watches and TCP probes (PROTOCOL.md "Files", "Watches",
 * "Probes").
 *
 * Everything is opened with O_PATH first and type-checked before it is read or written, so a
 * FIFO never blocks the agent and a device node is never opened. Paths are resolved with
 * openat2(RESOLVE_NO_MAGICLINKS) where the kernel has it.
 */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef RESOLVE_NO_MAGICLINKS
#define RESOLVE_NO_MAGICLINKS 0x02
#endif
#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE 1
#endif
#ifndef O_TMPFILE
#define O_TMPFILE (020000000 | O_DIRECTORY)
#endif
#define PROC_SUPER_MAGIC 0x9fa0
#define SYSFS_MAGIC 0x62656572
#define DEVPTS_SUPER_MAGIC 0x1cd1
#define MAX_TREE_DEPTH 256

struct open_how_compat {
    uint64_t flags, mode, resolve;
};

enum handle_kind { H_WRITE_FILE, H_FILE };

struct handle {
    enum handle_kind kind;
    int64_t num;
    int fd;
    int dirfd;       /* H_WRITE_FILE: O_PATH of the target's directory */
    char *name;      /* H_WRITE_FILE: the target's last component */
    char *tmpname;   /* H_WRITE_FILE without O_TMPFILE: the named temporary file */
    int64_t mode;    /* H_WRITE_FILE: MODE, or -1 */
};

/* ---------------------------------------------------------------- paths */

/* Copies a PATH-like field into out after checking PROTOCOL.md's rules; replies on error. */
static bool path_arg(struct conn *c, const struct msg *m, uint16_t tag, char *out)
{
    const struct field *f = msg_get(m, tag);
    const char *why = NULL;
    if (!f)
        why = "is missing";
    else if (f->len < 1 || f->len > MAX_PATH_BYTES || f->val[0] != '/')
        why = "must be an absolute path of at most 4096 bytes";
    else if (memchr(f->val, 0, f->len))
        why = "must not contain NUL";
    if (!why) {
        memcpy(out, f->val, f->len);
        out[f->len] = 0;
        if (f->len > 1) {
            for (const char *p = out + 1;;) {
                const char *slash = strchr(p, '/');
                size_t n = slash ? (size_t)(slash - p) : strlen(p);
                if (n == 0 || (n == 2 && !memcmp(p, "..", 2)) || (n == 1 && p[0] == '.')) {
                    why = "must not have an empty, '.' or '..' component";
                    break;
                }
                if (!slash)
                    break;
                p = slash + 1;
            }
        }
    }
    if (why) {
        reply_err(c, m->id, EINVAL, "%s %s", tag == SA_TAG_PATH2 ? "PATH2" : "PATH", why);
        return false;
    }
    return true;
}

/* Splits "/a/b" into parent "/a" (written to parent) and name "b" (pointing into path). */
static const char *split_path(const char *path, char *parent)
{
    const char *slash = strrchr(path, '/');
    size_t n = (size_t)(slash - path);
    if (n == 0) {
        strcpy(parent, "/");
    } else {
        memcpy(parent, path, n);
        parent[n] = 0;
    }
    return slash + 1;
}

static bool is_root(const char *path)
{
    return path[0] == '/' && path[1] == 0;
}

bool g_no_openat2; /* also set by --compat (tests of the gVisor paths) */
bool g_no_tmpfile;

/* Follows a final symlink by hand (the fallback has no RESOLVE_NO_MAGICLINKS): refusing
 * targets in /proc keeps magic links (/proc/self/fd/N, /proc/1/root) out. */
static int open_fallback(const char *path, int flags)
{
    char cur[MAX_PATH_BYTES + 1], link[MAX_PATH_BYTES + 1], next[2 * MAX_PATH_BYTES + 2];
    bool follow = !(flags & O_NOFOLLOW);
    snprintf(cur, sizeof cur, "%s", path);
    /* O_DIRECTORY is checked after the last hop: with O_NOFOLLOW it fails on a symlink to a
     * directory (ENOTDIR) before that link could be followed. */
    bool want_dir = flags & O_DIRECTORY;
    flags &= ~O_DIRECTORY;
    for (int hop = 0; hop < 40; hop++) {
        int fd = openat(AT_FDCWD, cur, flags | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            return -errno;
        struct stat st;
        if (fstat(fd, &st) < 0) {
            int e = errno;
            close(fd);
            return -e;
        }
        if (!follow || !S_ISLNK(st.st_mode)) {
            if (want_dir && !S_ISDIR(st.st_mode)) {
                close(fd);
                return -ENOTDIR;
            }
            return fd;
        }
        ssize_t n = readlinkat(fd, "", link, sizeof link - 1);
        close(fd);
        if (n <= 0)
            return -ELOOP;
        link[n] = 0;
        if (link[0] == '/') {
            snprintf(next, sizeof next, "%s", link);
        } else {
            char parent[MAX_PATH_BYTES + 1];
            split_path(cur, parent);
            snprintf(next, sizeof next, "%s/%s", is_root(parent) ? "" : parent, link);
        }
        if (strlen(next) > MAX_PATH_BYTES)
            return -ENAMETOOLONG;
        if (!strncmp(next, "/proc/", 6) || !strcmp(next, "/proc"))
            return -ELOOP;
        strcpy(cur, next);
    }
    return -ELOOP;
}

/* An O_PATH descriptor for path (flags: O_PATH plus O_NOFOLLOW/O_DIRECTORY), or -errno. */
static int open_resolved(const char *path, int flags)
{
    if (!g_no_openat2) {
        struct open_how_compat how = {.flags = (uint64_t)(flags | O_CLOEXEC),
                                      .resolve = RESOLVE_NO_MAGICLINKS};
        long fd = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
        if (fd >= 0)
            return (int)fd;
        if (errno != ENOSYS)
            return -errno;
        g_no_openat2 = true; /* gVisor, old kernels */
    }
    return open_fallback(path, flags);
}

/* The O_PATH descriptor of path's directory (symlinks followed), or -errno. */
static int open_parent(const char *path, const char **name)
{
    char parent[MAX_PATH_BYTES + 1];
    *name = split_path(path, parent);
    return open_resolved(parent, O_PATH | O_DIRECTORY);
}

/* Reopens an O_PATH descriptor for I/O: the same inode, whatever happened to the path since. */
static int reopen(int pfd, int flags)
{
    char p[40];
    snprintf(p, sizeof p, "/proc/self/fd/%d", pfd);
    int fd = open(p, flags | O_CLOEXEC | O_NOCTTY);
    return fd < 0 ? -errno : fd;
}

static bool special_path(const char *path)
{
    static const char *roots[] = {"/proc", "/sys", "/dev"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(roots[i]);
        if (!strncmp(path, roots[i], n) && (path[n] == 0 || path[n] == '/'))
            return true;
    }
    return false;
}

/* Writing is refused in /proc, /sys and /dev, by name and (through symlinks) by filesystem. */
static bool refuse_write(struct conn *c, uint32_t id, const char *path, int fd)
{
    struct statfs sf;
    bool bad = special_path(path);
    if (!bad && fd >= 0 && fstatfs(fd, &sf) == 0)
        bad = sf.f_type == PROC_SUPER_MAGIC || sf.f_type == SYSFS_MAGIC ||
              sf.f_type == DEVPTS_SUPER_MAGIC;
    if (bad)
        reply_err(c, id, EACCES, "%s: writing in /proc, /sys and /dev is refused", path);
    return bad;
}

static int type_of(mode_t mode)
{
    if (S_ISREG(mode))
        return SA_TYPE_FILE;
    if (S_ISDIR(mode))
        return SA_TYPE_DIRECTORY;
    if (S_ISLNK(mode))
        return SA_TYPE_SYMLINK;
    return SA_TYPE_OTHER;
}

static void put_stat(struct conn *c, const struct stat *st, int dirfd, const char *name)
{
    fr_int(c, SA_TAG_TYPE, type_of(st->st_mode));
    fr_int(c, SA_TAG_SIZE, st->st_size);
    fr_int(c, SA_TAG_MODE, st->st_mode & 07777);
    fr_int(c, SA_TAG_UID, st->st_uid);
    fr_int(c, SA_TAG_GID, st->st_gid);
    fr_int(c, SA_TAG_MTIME_NS, (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec);
    if (S_ISLNK(st->st_mode)) {
        char link[MAX_PATH_BYTES + 1];
        ssize_t n = readlinkat(dirfd, name, link, sizeof link);
        if (n >= 0)
            fr_bytes(c, SA_TAG_LINK, link, (size_t)n);
    }
}

static void reply_errno(struct conn *c, uint32_t id, int err, const char *path)
{
    reply_err(c, id, err, "%s: %s", path, strerror(err));
}

/* ---------------------------------------------------------------- STAT, LIST, READ_FILE */

void h_stat(struct conn *c, const struct msg *m)
{
    char path[MAX_PATH_BYTES + 1];
    if (!path_arg(c, m, SA_TAG_PATH, path))
        return;
    int fd = open_resolved(path, O_PATH | O_NOFOLLOW);
    struct stat st;
    if (fd < 0) {
        reply_errno(c, m->id, -fd, path);
        return;
    }
    if (fstat(fd, &st) < 0) {
        reply_errno(c, m->id, errno, path);
    } else {
        size_t r = fr_begin(c, SA_T_OK, m->id);
        put_stat(c, &st, fd, "");
        fr_end(c, r);
    }
    close(fd);
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The names in directory dfd (sorted), or NULL with errno set. */
static char **read_names(int dfd, size_t *count)
{
    int fd = openat(dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    if (!d) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        errno = e;
        return NULL;
    }
    size_t n = 0, cap = 64;
    char **names = xmalloc(cap * sizeof *names);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        if (n >= SA_LIMIT_MAX_DIR_ENTRIES) {
            for (size_t i = 0; i < n; i++)
                free(names[i]);
            free(names);
            closedir(d);
            errno = EMFILE;
            return NULL;
        }
        if (n == cap) {
            cap *= 2;
            char **p = realloc(names, cap * sizeof *names);
            if (!p)
                xmalloc(SIZE_MAX);
            names = p;
        }
        names[n++] = xstrndup(e->d_name, strlen(e->d_name));
    }
    closedir(d);
    qsort(names, n, sizeof *names, cmp_names);
    *count = n;
    return names;
}

void h_list(struct conn *c, const struct msg *m)
{
    char path[MAX_PATH_BYTES + 1];
    int64_t start = 0, count = SA_LIMIT_MAX_LIST_ENTRIES;
    if (!path_arg(c, m, SA_TAG_PATH, path))
        return;
    if (msg_int(m, SA_TAG_START, &start) < 0 || msg_int(m, SA_TAG_COUNT, &count) < 0 || start < 0 ||
        count < 1) {
        reply_err(c, m->id, EINVAL, "START must be >= 0 and COUNT >= 1");
        return;
    }
    if (count > SA_LIMIT_MAX_LIST_ENTRIES)
        count = SA_LIMIT_MAX_LIST_ENTRIES;
    int dfd = open_resolved(path, O_PATH);
    struct stat st;
    if (dfd < 0) {
        reply_errno(c, m->id, -dfd, path);
        return;
    }
    if (fstat(dfd, &st) == 0 && !S_ISDIR(st.st_mode)) {
        reply_errno(c, m->id, ENOTDIR, path);
        close(dfd);
        return;
    }
    size_t n;
    char **names = read_names(dfd, &n);
    if (!names) {
        reply_errno(c, m->id, errno, path);
        close(dfd);
        return;
    }
    size_t r = fr_begin(c, SA_T_OK, m->id);
    size_t i = (size_t)start < n ? (size_t)start : n;
    /* Stop early when the next entry might not fit the frame: MORE says there is more. */
    for (int64_t k = 0; i < n && k < count; i++) {
        if (c->out.len - r > SA_MAX_PAYLOAD - 2 * MAX_PATH_BYTES - 1024)
            break;
        struct stat est;
        if (fstatat(dfd, names[i], &est, AT_SYMLINK_NOFOLLOW) < 0)
            continue; /* removed since it was listed */
        size_t e = fr_nest_begin(c, SA_TAG_ENTRY);
        fr_str(c, SA_TAG_NAME, names[i]);
        put_stat(c, &est, dfd, names[i]);
        fr_nest_end(c, e);
        k++;
    }
    if (i < n)
        fr_int(c, SA_TAG_MORE, 1);
    fr_end(c, r);
    for (size_t k = 0; k < n; k++)
        free(names[k]);
    free(names);
    close(dfd);
}

/* Opens a regular file for I/O after checking its type on an O_PATH descriptor. */
static int open_regular(const char *path, int flags, int *err)
{
    int pfd = open_resolved(path, O_PATH);
    if (pfd < 0) {
        *err = -pfd;
        return -1;
    }
    struct stat st;
    int fd = -1;
    if (fstat(pfd, &st) < 0)
        *err = errno;
    else if (S_ISDIR(st.st_mode))
        *err = EISDIR;
    else if (!S_ISREG(st.st_mode))
        *err = EINVAL;
    else if ((fd = reopen(pfd, flags)) < 0)
        *err = -fd;
    close(pfd);
    return fd;
}

static void reply_open_err(struct conn *c, uint32_t id, int err, const char *path)
{
    if (err == EINVAL)
        reply_err(c, id, EINVAL, "%s: not a regular file", path);
    else
        reply_errno(c, id, err, path);
}

/* Appends a DATA field read by pread/read straight into the reply; returns bytes read. */
static ssize_t fr_read_data(struct conn *c, int fd, size_t n, off_t off, bool positional)
{
    size_t pos = fr_nest_begin(c, SA_TAG_DATA);
    buf_reserve(&c->out, n);
    ssize_t got;
    do
        got = positional ? pread(fd, c->out.p + c->out.len, n, off) : read(fd, c->out.p + c->out.len, n);
    while (got < 0 && errno == EINTR);
    if (got > 0)
        c->out.len += (size_t)got;
    fr_nest_end(c, pos);
    return got;
}

void h_read_file(struct conn *c, const struct msg *m)
{
    char path[MAX_PATH_BYTES + 1];
    int64_t offset, length;
    if (!path_arg(c, m, SA_TAG_PATH, path))
        return;
    if (msg_int(m, SA_TAG_OFFSET, &offset) != 1 || msg_int(m, SA_TAG_LENGTH, &length) != 1 ||
        offset < 0 || length < 0) {
        reply_err(c, m->id, EINVAL, "READ_FILE needs OFFSET >= 0 and LENGTH >= 0");
        return;
    }
    if (length > SA_LIMIT_MAX_DATA)
        length = SA_LIMIT_MAX_DATA;
    int err = 0;
    int fd = open_regular(path, O_RDONLY, &err);
    if (fd < 0) {
        reply_open_err(c, m->id, err, path);
        return;
    }
    size_t r = fr_begin(c, SA_T_DATA, m->id);
    fr_int(c, SA_TAG_OFFSET, offset);
    ssize_t got = fr_read_data(c, fd, (size_t)length, offset, true);
    struct stat st;
    if (got < 0 || fstat(fd, &st) < 0) {
        int e = errno;
        c->out.len = r; /* drop the half-built frame */
        reply_errno(c, m->id, e, path);
        close(fd);
        return;
    }
    if (got < length || offset + got >= st.st_size)
        fr_int(c, SA_TAG_EOF, 1);
    fr_int(c, SA_TAG_SIZE, st.st_size);
    fr_end(c, r);
    close(fd);
}

/* ---------------------------------------------------------------- handles */

static struct handle *handle_get(struct conn *c, const struct msg *m)
{
    int64_t num;
    if (msg_int(m, SA_TAG_HANDLE, &num) == 1)
        for (int i = 0; i < SA_LIMIT_MAX_HANDLES; i++)
            if (c->handles[i] && c->handles[i]->num == num)
                return c->handles[i];
    reply_err(c, m->id, EBADF, "no such HANDLE on this connection");
    return NULL;
}

static struct handle *handle_new(struct conn *c, uint32_t id, enum handle_kind kind)
{
    for (int i = 0; i < SA_LIMIT_MAX_HANDLES; i++) {
        if (c->handles[i])
            continue;
        struct handle *h = calloc(1, sizeof *h);
        if (!h)
            xmalloc(SIZE_MAX);
        h->kind = kind;
        h->num = c->next_handle++;
        h->fd = h->dirfd = -1;
        h->mode = -1;
        c->handles[i] = h;
        return h;
    }
    reply_err(c, id, EMFILE, "too many open handles on this connection (max %d)", SA_LIMIT_MAX_HANDLES);
    return NULL;
}

/* Closes a handle; an uncommitted whole-file write is discarded. */
static void handle_free(struct conn *c, struct handle *h)
{
    if (h->tmpname && h->dirfd >= 0)
        unlinkat(h->dirfd, h->tmpname, 0);
    if (h->fd >= 0)
        close(h->fd);
    if (h->dirfd >= 0)
        close(h->dirfd);
    free(h->name);
    free(h->tmpname);
    for (int i = 0; i < SA_LIMIT_MAX_HANDLES; i++)
        if (c->handles[i] == h)
            c->handles[i] = NULL;
    free(h);
}

static void reply_handle(struct conn *c, uint32_t id, struct handle *h)
{
    size_t r = fr_begin(c, SA_T_OK, id);
    fr_int(c, SA_TAG_HANDLE, h->num);
    fr_end(c, r);
}

static bool write_all_fd(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

/* mkdir -p of path, resolving every level inside the sandbox; 0 or -errno. */
static int make_dirs(const char *path)
{
    char prefix[MAX_PATH_BYTES + 1];
    size_t len = strlen(path);
    for (size_t i = 1; i <= len; i++) {
        if (i < len && path[i] != '/')
            continue;
        memcpy(prefix, path, i);
        prefix[i] = 0;
        int fd = open_resolved(prefix, O_PATH | O_DIRECTORY);
        if (fd >= 0) {
            close(fd);
            continue;
        }
        if (fd != -ENOENT)
            return fd;
        const char *name;
        int pfd = open_parent(prefix, &name);
        if (pfd < 0)
            return pfd;
        int rc = mkdirat(pfd, name, 0755);
        int e = errno;
        close(pfd);
        if (rc < 0 && e != EEXIST)
            return -e;
    }
    return 0;
}

static void random_name(char *out, size_t n, const char *prefix)
{
    static uint64_t counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t x = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ (++counter * 0x9E3779B97F4A7C15ull);
    snprintf(out, n, "%s%016llx", prefix, (unsigned long long)x);
}

void h_write_begin(struct conn *c, const struct msg *m)
{
    char path[MAX_PATH_BYTES + 1];
    if (!path_arg(c, m, SA_TAG_PATH, path))
        return;
    int64_t mode = -1;
    if (msg_int(m, SA_TAG_MODE, &mode) < 0 || (msg_get(m, SA_TAG_MODE) && (mode < 0 || mode > 07777))) {
        reply_err(c, m->id, EINVAL, "MODE must be 0..07777");
        return;
    }
    if (is_root(path)) {
        reply_errno(c, m->id, EISDIR, path);
        return;
    }
    if (refuse_write(c, m->id, path, -1))
        return;
    char parent[MAX_PATH_BYTES + 1];
    split_path(path, parent);
    if (msg_flag(m, SA_TAG_PARENTS)) {
        int rc = make_dirs(parent);
        if (rc < 0) {
            reply_errno(c, m->id, -rc, parent);
            return;
        }
    }
    const char *name;
    int dirfd = open_parent(path, &name);
    if (dirfd < 0) {
        reply_errno(c, m->id, -dirfd, parent);
        return;
    }
    struct stat st;
    if (refuse_write(c, m->id, path, dirfd)) {
        close(dirfd);
        return;
    }
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode)) {
        reply_errno(c, m->id, EISDIR, path);
        close(dirfd);
        return;
    }
    struct handle *h = handle_new(c, m->id, H_WRITE_FILE);
    if (!h) {
        close(dirfd);
        return;
    }
    h->dirfd = dirfd;
    h->name = xstrndup(name, strlen(name));
    h->mode = mode;
    h->fd = g_no_tmpfile ? (errno = EOPNOTSUPP, -1) : openat(dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    if (h->fd < 0 && errno != ENOENT && errno != EACCES && errno != EROFS && errno != ENOSPC) {
        /* No O_TMPFILE here (gVisor, some filesystems): a hidden, exclusively created name. */
        char tmp[64];
        for (int tries = 0; tries < 8 && h->fd < 0; tries++) {
            random_name(tmp, sizeof tmp, ".shoal-tmp-");
            h->fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        }
        if (h->fd >= 0)
            h->tmpname = xstrndup(tmp, strlen(tmp));
    }
    if (h->fd < 0) {
        int e = errno;
        handle_free(c, h);
        reply_errno(c, m->id, e, path);
        return;
    }
    reply_handle(c, m->id, h);
}

void h_write_chunk(struct conn *c, const struct msg *m)
{
    struct handle *h = handle_get(c, m);
    if (!h)
        return;
    const struct field *d = msg_get(m, SA_TAG_DATA);
    if (h->kind != H_WRITE_FILE) {
        reply_err(c, m->id, EBADF, "HANDLE is not a WRITE_BEGIN handle");
        return;
    }
    if (d && !write_all_fd(h->fd, d->val, d->len)) {
        reply_err(c, m->id, errno, "write: %s", strerror(errno));
        return;
    }
    reply_ok(c, m->id);
}

/* Links the unnamed file under a fresh hidden name in its directory; 0 or -errno. */
static int link_tmpfile(struct handle *h, char *tmp, size_t n)
{
    for (int tries = 0; tries < 8; tries++) {
        random_name(tmp, n, ".shoal-tmp-");
        if (linkat(h->fd, "", h->dirfd, tmp, AT_EMPTY_PATH) == 0)
            return 0;
        if (errno == EEXIST)
            continue;
        /* AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH, which containers usually lack. */
        char p[40];
        snprintf(p, sizeof p, "/proc/self/fd/%d", h->fd);
        if (linkat(AT_FDCWD, p, h->dirfd, tmp, AT_SYMLINK_FOLLOW) == 0)
            return 0;
        if (errno != EEXIST)
            return -errno;
    }
    return -EEXIST;
}

void h_write_commit(struct conn *c, const struct msg *m)
{
    struct handle *h = handle_get(c, m);
    if (!h)
        return;
    if (h->kind != H_WRITE_FILE) {
        reply_err(c, m->id, EBADF, "HANDLE is not a WRITE_BEGIN handle");
        return;
    }
    struct stat st;
    int err = 0;
    if (fsync(h->fd) < 0)
        err = errno;
    if (!err && fstatat(h->dirfd, h->name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode)) {
        if (fchown(h->fd, st.st_uid, st.st_gid) < 0 && errno != EPERM)
            err = errno;
        else if (fchmod(h->fd, st.st_mode & 07777) < 0) /* after chown, which clears setuid */
            err = errno;
    } else if (!err) {
        (void)!fchown(h->fd, 0, 0);
        if (fchmod(h->fd, h->mode >= 0 ? (mode_t)h->mode : 0644) < 0)
            err = errno;
    }
    char tmp[64];
    if (!err && !h->tmpname) {
        int rc = link_tmpfile(h, tmp, sizeof tmp);
        if (rc < 0)
            err = -rc;
        else
            h->tmpname = xstrndup(tmp, strlen(tmp));
    }
    if (!err && renameat(h->dirfd, h->tmpname, h->dirfd, h->name) < 0)
        err = errno;
    if (!err) {
        free(h->tmpname); /* renamed: nothing left to unlink */
        h->tmpname = NULL;
    }
    handle_free(c, h);
    if (err)
        reply_err(c, m->id, err, "commit: %s", strerror(err));
    else
        reply_ok(c, m->id);
}

void h_write_abort(struct conn *c, const struct msg *m)
{
    struct handle *h = handle_get(c, m);
    if (!h)
        return;
    handle_free(c, h);
    reply_ok(c, m->id);
}

/* ---------------------------------------------------------------- MKDIR, REMOVE, RENAME */

void h_mkdir(struct conn *c, const struct msg *m)
{
    char path[MAX_PATH_BYTES + 1];
    if (!path_arg(c, m, SA_TAG_PATH, path))
        return;
    bool exist_ok = msg_flag(m, SA_TAG_EXIST_OK);
    if (is_root(path)) {
        if (exist_ok)
            reply_ok(c, m->id);
        else
            reply_errno(c, m->id, EEXIST, path);
        return;
    }
    if (refuse_write(c, m->id, path, -1))
        return;
    if (msg_flag(m, SA_TAG_PARENTS)) {
        char parent[MAX_PATH_BYTES + 1];
        split_path(path, parent);
        int rc = make_dirs(parent);
        if (rc < 0) {
            reply_errno(c, m->id, -rc, parent);
            return;
        }
    }
    const char *name;
    int pfd = open_parent(path, &name);
    if (pfd < 0) {
        reply_errno(c, m->id, -pfd, path);
        return;
    }
    if (!refuse_write(c, m->id, path, pfd)) {
        struct stat st;
        if (mkdirat(pfd, name, 0755) == 0)
            reply_ok(c, m->id);
        else if (errno == EEXIST && exist_ok && fstatat(pfd, name, &st, 0) == 0 && S_ISDIR(st.st_mode))
            reply_ok(c, m->id);
        else
            reply_errno(c, m->id, errno, path);
    }
    close(pfd);
}

/* Empties directory `name` in dirfd without following symlinks; 0 or -errno. */
static int remove_tree(int dirfd, const char *name, int depth)
{
    if (depth > MAX_TREE_DEPTH)
        return -ELOOP;
    int fd = openat(dirfd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t n;
    char **names = read_names(fd, &n);
    int rc = names ? 0 : -errno;
    for (size_t i = 0; names && i < n; i++) {
        struct stat st;
        if (rc == 0 && fstatat(fd, names[i], &st, AT_SYMLINK_NOFOLLOW) == 0) {
            if (S_ISDIR(st.st_mode)) {
                rc = remove_tree(fd, names[i], depth + 1);
                if (rc == 0 && unlinkat(fd, names[i], AT_REMOVEDIR) < 0 && errno != ENOENT)
                    rc = -errno;
            } else if (unlinkat(fd, names[i], 0) < 0 && errno != ENOENT) {
                rc = -errno;
            }
        }
        free(names[i]);
    }
    free(names);
    close(fd);
    return rc;
}

void h_remove(struct conn *c, const struct msg *m)
{
    char path[MAX_PATH_BYTES + 1];
    if (!path_arg(c, m, SA_TAG_PATH, path))
        return;
    if (is_root(path)) {
        reply_err(c, m->id, EBUSY, "/ cannot be removed");
        return;
    }
    if (refuse_write(c, m->id, path, -1))
        return;
    const char *name;
    int pfd = open_parent(path, &name);
    if (pfd < 0) {
        reply_errno(c, m->id, -pfd, path);
        return;
    }
    struct stat st;
    int err = 0;
    if (refuse_write(c, m->id, path, pfd)) {
        close(pfd);
        return;
    }
    if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        err = errno;
    } else if (S_ISDIR(st.st_mode)) {
        if (msg_flag(m, SA_TAG_RECURSIVE))
            err = -remove_tree(pfd, name, 0);
        if (!err && unlinkat(pfd, name, AT_REMOVEDIR) < 0)
            err = errno == EEXIST ? ENOTEMPTY : errno;
    } else if (unlinkat(pfd, name, 0) < 0) {
        err = errno;
    }
    if (err)
        reply_errno(c, m->id, err, path);
    else
        reply_ok(c, m->id);
    close(pfd);
}

void h_rename(struct conn *c, const struct msg *m)
{
    char src[MAX_PATH_BYTES + 1], dst[MAX_PATH_BYTES + 1];
    if (!path_arg(c, m, SA_TAG_PATH, src) || !path_arg(c, m, SA_TAG_PATH2, dst))
        return;
    if (is_root(src) || is_root(dst)) {
        reply_err(c, m->id, EBUSY, "/ cannot be renamed or replaced");
        return;
    }
    if (refuse_write(c, m->id, src, -1) || refuse_write(c, m->id, dst, -1))
        return;
    const char *n1, *n2;
    int p1 = open_parent(src, &n1);
    if (p1 < 0) {
        reply_errno(c, m->id, -p1, src);
        return;
    }
    int p2 = open_parent(dst, &n2);
    if (p2 < 0) {
        reply_errno(c, m->id, -p2, dst);
        close(p1);
        return;
    }
    if (!refuse_write(c, m->id, src, p1) && !refuse_write(c, m->id, dst, p2)) {
        bool overwrite = msg_flag(m, SA_TAG_OVERWRITE);
        long rc = syscall(SYS_renameat2, p1, n1, p2, n2, overwrite ? 0 : RENAME_NOREPLACE);
        if (rc < 0 && !overwrite && errno == EINVAL) {
            /* A filesystem without RENAME_NOREPLACE (or a move into itself: renameat says). */
            struct stat st;
            if (fstatat(p2, n2, &st, AT_SYMLINK_NOFOLLOW) == 0)
                errno = EEXIST;
            else
                rc = renameat(p1, n1, p2, n2);
        }
        if (rc < 0)
            reply_err(c, m->id, errno, "rename %s to %s: %s", src, dst, strerror(errno));
        else
            reply_ok(c, m->id);
    }
    close(p1);
    close(p2);
}

/* ---------------------------------------------------------------- H_* file handles */

void h_hopen(struct conn *c, const struct msg *m)
{
    char path[MAX_PATH_BYTES + 1];
    int64_t fl;
    if (!path_arg(c, m, SA_TAG_PATH, path))
        return;
    if (msg_int(m, SA_TAG_FLAGS, &fl) != 1 || !(fl & (SA_FLAGS_READ | SA_FLAGS_WRITE)) || fl & ~63) {
        reply_err(c, m->id, EINVAL, "FLAGS needs READ and/or WRITE, plus CREATE/TRUNCATE/APPEND/EXCLUSIVE");
        return;
    }
    int acc = (fl & SA_FLAGS_READ) && (fl & SA_FLAGS_WRITE) ? O_RDWR : (fl & SA_FLAGS_WRITE) ? O_WRONLY : O_RDONLY;
    int extra = (fl & SA_FLAGS_TRUNCATE ? O_TRUNC : 0) | (fl & SA_FLAGS_APPEND ? O_APPEND : 0);
    bool writes = fl & (SA_FLAGS_WRITE | SA_FLAGS_CREATE | SA_FLAGS_TRUNCATE | SA_FLAGS_APPEND);
    if (writes && refuse_write(c, m->id, path, -1))
        return;
    int fd = -1, err = 0;
    for (int attempt = 0; attempt < 2 && fd < 0; attempt++) {
        bool create = fl & SA_FLAGS_EXCLUSIVE;
        if (!create) {
            fd = open_regular(path, acc | extra, &err);
            create = fd < 0 && err == ENOENT && (fl & SA_FLAGS_CREATE);
        }
        if (create) {
            /* A new name: O_EXCL creates a regular file, never opens anything else. */
            const char *name;
            int pfd = open_parent(path, &name);
            if (pfd < 0) {
                err = -pfd;
                break;
            }
            if (!refuse_write(c, m->id, path, pfd)) {
                fd = openat(pfd, name, acc | extra | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0644);
                err = fd < 0 ? errno : 0;
            } else {
                close(pfd);
                return;
            }
            close(pfd);
            if (fd < 0 && err == EEXIST && !(fl & SA_FLAGS_EXCLUSIVE))
                continue; /* created meanwhile: open it as an existing file */
        }
        break;
    }
    if (fd < 0) {
        reply_open_err(c, m->id, err, path);
        return;
    }
    struct handle *h = handle_new(c, m->id, H_FILE);
    if (!h) {
        close(fd);
        return;
    }
    h->fd = fd;
    reply_handle(c, m->id, h);
}

static struct handle *file_handle(struct conn *c, const struct msg *m)
{
    struct handle *h = handle_get(c, m);
    if (h && h->kind != H_FILE) {
        reply_err(c, m->id, EBADF, "HANDLE is a WRITE_BEGIN handle, not an H_OPEN one");
        return NULL;
    }
    return h;
}

void h_hread(struct conn *c, const struct msg *m)
{
    struct handle *h = file_handle(c, m);
    int64_t len;
    if (!h)
        return;
    if (msg_int(m, SA_TAG_LENGTH, &len) != 1 || len < 0) {
        reply_err(c, m->id, EINVAL, "H_READ needs LENGTH >= 0");
        return;
    }
    if (len > SA_LIMIT_MAX_DATA)
        len = SA_LIMIT_MAX_DATA;
    bool line = msg_flag(m, SA_TAG_LINE);
    off_t pos = line ? lseek(h->fd, 0, SEEK_CUR) : 0;
    size_t r = fr_begin(c, SA_T_DATA, m->id);
    size_t data_at = c->out.len + 6;
    ssize_t got = fr_read_data(c, h->fd, (size_t)len, pos, line);
    if (got < 0) {
        int e = errno;
        c->out.len = r;
        reply_err(c, m->id, e, "read: %s", strerror(e));
        return;
    }
    bool eof = got < len;
    if (line) {
        uint8_t *nl = memchr(c->out.p + data_at, '\n', (size_t)got);
        if (nl) {
            /* Keep up to the newline; the file position moves just past it. */
            size_t keep = (size_t)(nl - (c->out.p + data_at)) + 1;
            c->out.len = data_at + keep;
            fr_nest_end(c, data_at - 6);
            eof = false;
            got = (ssize_t)keep;
        }
        lseek(h->fd, pos + got, SEEK_SET);
    }
    if (eof)
        fr_int(c, SA_TAG_EOF, 1);
    fr_end(c, r);
}

void h_hwrite(struct conn *c, const struct msg *m)
{
    struct handle *h = file_handle(c, m);
    if (!h)
        return;
    const struct field *d = msg_get(m, SA_TAG_DATA);
    if (d && !write_all_fd(h->fd, d->val, d->len)) {
        reply_err(c, m->id, errno, "write: %s", strerror(errno));
        return;
    }
    reply_ok(c, m->id);
}

void h_hseek(struct conn *c, const struct msg *m)
{
    struct handle *h = file_handle(c, m);
    int64_t off, whence;
    if (!h)
        return;
    if (msg_int(m, SA_TAG_OFFSET, &off) != 1 || msg_int(m, SA_TAG_WHENCE, &whence) != 1 ||
        whence < SA_WHENCE_SET || whence > SA_WHENCE_END) {
        reply_err(c, m->id, EINVAL, "H_SEEK needs OFFSET and WHENCE (0 set, 1 current, 2 end)");
        return;
    }
    static const int whences[3] = {SEEK_SET, SEEK_CUR, SEEK_END};
    off_t pos = lseek(h->fd, off, whences[whence]);
    if (pos < 0) {
        reply_err(c, m->id, errno, "seek: %s", strerror(errno));
        return;
    }
    size_t r = fr_begin(c, SA_T_OK, m->id);
    fr_int(c, SA_TAG_OFFSET, pos);
    fr_end(c, r);
}

void h_hflush(struct conn *c, const struct msg *m)
{
    struct handle *h = file_handle(c, m);
    if (!h)
        return;
    if (fsync(h->fd) < 0 && errno != EINVAL) /* EINVAL: nothing to sync (e.g. read-only fs) */
        reply_err(c, m->id, errno, "fsync: %s", strerror(errno));
    else
        reply_ok(c, m->id);
}

void h_hclose(struct conn *c, const struct msg *m)
{
    struct handle *h = handle_get(c, m);
    if (!h)
        return;
    handle_free(c, h);
    reply_ok(c, m->id);
}

/* ---------------------------------------------------------------- watches */

/* One inotify watch descriptor used by one WATCH (the same wd may serve several WATCHes). */
struct wrec {
    int wd;
    uint32_t watch_id;
    bool recursive;
    bool root; /* the WATCH's own path: its *_SELF events are reported */
    char *path;
};

#define WATCH_MASK (IN_CREATE | IN_MODIFY | IN_ATTRIB | IN_DELETE | IN_DELETE_SELF | IN_MOVED_FROM | \
                    IN_MOVED_TO | IN_MOVE_SELF | IN_ACCESS | IN_CLOSE_WRITE)

void watch_update_polling(struct conn *c)
{
    if (c->ino_fd < 0)
        return;
    bool want = c->reading; /* the same high-water mark as requests */
    if (want == c->ino_polling)
        return;
    if (want)
        ep_add(c->ino_fd, EPOLLIN, &c->ino_ev);
    else
        ep_del(c->ino_fd);
    c->ino_polling = want;
}

static int wrec_add(struct conn *c, int wd, uint32_t watch_id, bool recursive, bool root, const char *path)
{
    for (size_t i = 0; i < c->nwrec; i++)
        if (c->wrecs[i].wd == wd && c->wrecs[i].watch_id == watch_id)
            return 0; /* seen already (a directory reached twice) */
    if (c->nwrec >= SA_LIMIT_MAX_WATCHES)
        return -EMFILE;
    if (c->nwrec == c->wcap) {
        size_t cap = c->wcap ? c->wcap * 2 : 16;
        struct wrec *p = realloc(c->wrecs, cap * sizeof *p);
        if (!p)
            xmalloc(SIZE_MAX);
        c->wrecs = p;
        c->wcap = cap;
    }
    c->wrecs[c->nwrec++] = (struct wrec){wd, watch_id, recursive, root, xstrndup(path, strlen(path))};
    return 0;
}

static bool wd_in_use(struct conn *c, int wd)
{
    for (size_t i = 0; i < c->nwrec; i++)
        if (c->wrecs[i].wd == wd)
            return true;
    return false;
}

/* Drops the records matching (watch_id, or wd when watch_id is 0) and unused inotify wds. */
static void wrec_remove(struct conn *c, uint32_t watch_id, int wd, bool rm_watch)
{
    size_t k = 0;
    int *freed = xmalloc(sizeof(int) * (c->nwrec + 1));
    size_t nfreed = 0;
    for (size_t i = 0; i < c->nwrec; i++) {
        struct wrec *w = &c->wrecs[i];
        bool match = watch_id ? w->watch_id == watch_id : w->wd == wd;
        if (match) {
            freed[nfreed++] = w->wd;
            free(w->path);
        } else {
            c->wrecs[k++] = *w;
        }
    }
    c->nwrec = k;
    for (size_t i = 0; rm_watch && i < nfreed; i++)
        if (!wd_in_use(c, freed[i]))
            inotify_rm_watch(c->ino_fd, freed[i]); /* a repeat for the same wd just fails */
    free(freed);
}

/* inotify_add_watch on the inode behind an O_PATH descriptor: through /proc/self/fd the kernel
 * watches exactly the inode that was resolved (and checked) inside the sandbox. */
static int add_watch_fd(struct conn *c, int fd, const char *path)
{
    char p[40];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    int wd = inotify_add_watch(c->ino_fd, p, WATCH_MASK);
    if (wd < 0 && errno == ENOENT) /* no /proc: by name */
        wd = inotify_add_watch(c->ino_fd, path, WATCH_MASK | IN_DONT_FOLLOW);
    return wd;
}

/* Adds fd (named path; when recursive, every directory below it) to watch_id; 0 or -errno. */
static int watch_tree(struct conn *c, uint32_t watch_id, const char *path, int fd, bool recursive,
                      bool root, int depth)
{
    int wd = add_watch_fd(c, fd, path);
    if (wd < 0)
        return errno == ENOSPC ? -EMFILE : -errno;
    int rc = wrec_add(c, wd, watch_id, recursive, root, path);
    struct stat st;
    if (rc < 0 || !recursive || fstat(fd, &st) < 0 || !S_ISDIR(st.st_mode))
        return rc;
    if (depth > MAX_TREE_DEPTH)
        return -ELOOP;
    size_t n;
    char **names = read_names(fd, &n);
    for (size_t i = 0; names && i < n; i++) {
        int sub_fd = rc ? -1 : openat(fd, names[i], O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (sub_fd >= 0) { /* not a directory (or gone): nothing to watch below */
            char sub[MAX_PATH_BYTES + 1];
            int k = snprintf(sub, sizeof sub, "%s/%s", is_root(path) ? "" : path, names[i]);
            if (k < (int)sizeof sub)
                rc = watch_tree(c, watch_id, sub, sub_fd, true, false, depth + 1);
            close(sub_fd);
        }
        free(names[i]);
    }
    free(names);
    return rc;
}

void h_watch(struct conn *c, const struct msg *m)
{
    char path[MAX_PATH_BYTES + 1];
    if (!path_arg(c, m, SA_TAG_PATH, path))
        return;
    for (size_t i = 0; i < c->nwrec; i++)
        if (c->wrecs[i].watch_id == m->id) {
            reply_err(c, m->id, EEXIST, "a WATCH with this id is active");
            return;
        }
    /* Resolve inside the sandbox: a missing path or a magic link fails here. */
    int pfd = open_resolved(path, O_PATH);
    if (pfd < 0) {
        reply_errno(c, m->id, -pfd, path);
        return;
    }
    if (c->ino_fd < 0) {
        c->ino_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (c->ino_fd < 0) {
            reply_err(c, m->id, errno == EMFILE ? EMFILE : errno, "inotify: %s", strerror(errno));
            close(pfd);
            return;
        }
        c->ino_polling = false;
        watch_update_polling(c);
    }
    int rc = watch_tree(c, m->id, path, pfd, msg_flag(m, SA_TAG_RECURSIVE), true, 0);
    close(pfd);
    if (rc < 0) {
        wrec_remove(c, m->id, 0, true);
        if (rc == -EMFILE)
            reply_err(c, m->id, EMFILE, "%s: more than %d directories to watch", path, SA_LIMIT_MAX_WATCHES);
        else
            reply_errno(c, m->id, -rc, path);
        return;
    }
    reply_ok(c, m->id);
}

void h_unwatch(struct conn *c, const struct msg *m)
{
    bool found = false;
    for (size_t i = 0; i < c->nwrec && !found; i++)
        found = c->wrecs[i].watch_id == m->id;
    if (!found) {
        reply_err(c, m->id, EBADF, "no WATCH with this id");
        return;
    }
    wrec_remove(c, m->id, 0, true);
    reply_ok(c, m->id);
}

static void send_event(struct conn *c, uint32_t watch_id, const char *path, const char *name, int kind)
{
    size_t r = fr_begin(c, SA_T_EVENT, watch_id);
    size_t pos = fr_nest_begin(c, SA_TAG_PATH);
    buf_append(&c->out, path, strlen(path));
    if (name && *name) {
        if (!is_root(path))
            buf_append(&c->out, "/", 1);
        buf_append(&c->out, name, strlen(name));
    }
    fr_nest_end(c, pos);
    fr_int(c, SA_TAG_KIND, kind);
    fr_end(c, r);
}

static int kind_of(uint32_t mask)
{
    if (mask & (IN_CREATE | IN_MOVED_TO))
        return SA_KIND_CREATE;
    if (mask & (IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF))
        return SA_KIND_REMOVE;
    if (mask & (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE))
        return SA_KIND_MODIFY;
    if (mask & IN_ACCESS)
        return SA_KIND_ACCESS;
    return 0;
}

static void handle_inotify_event(struct conn *c, const struct inotify_event *e)
{
    if (e->mask & IN_Q_OVERFLOW) {
        uint32_t last = 0;
        for (size_t i = 0; i < c->nwrec; i++)
            if (c->wrecs[i].root && c->wrecs[i].watch_id != last)
                send_event(c, last = c->wrecs[i].watch_id, "", NULL, SA_KIND_OVERFLOW);
        return;
    }
    if (e->mask & IN_IGNORED) {
        wrec_remove(c, 0, e->wd, false); /* the kernel dropped the wd already */
        return;
    }
    int kind = kind_of(e->mask);
    const char *name = e->len ? e->name : NULL;
    bool self = e->mask & (IN_DELETE_SELF | IN_MOVE_SELF);
    /* IN_CLOSE_WRITE after IN_MODIFY would repeat the MODIFY: report it only alone. */
    if (!kind || ((e->mask & IN_CLOSE_WRITE) && !(e->mask & (IN_MODIFY | IN_ATTRIB))))
        return;
    size_t n = c->nwrec; /* records added below (new subdirectories) get their own events */
    for (size_t i = 0; i < n && i < c->nwrec; i++) {
        struct wrec *w = &c->wrecs[i];
        if (w->wd != e->wd || (self && !w->root))
            continue;
        send_event(c, w->watch_id, w->path, name, kind);
        if (w->recursive && name && (e->mask & IN_ISDIR) && (e->mask & (IN_CREATE | IN_MOVED_TO))) {
            char sub[MAX_PATH_BYTES + 1];
            int k = snprintf(sub, sizeof sub, "%s/%s", is_root(w->path) ? "" : w->path, name);
            int fd = k < (int)sizeof sub ? open_resolved(sub, O_PATH | O_DIRECTORY | O_NOFOLLOW) : -1;
            if (fd >= 0) {
                uint32_t id = w->watch_id;
                watch_tree(c, id, sub, fd, true, false, 1); /* may realloc wrecs: w is stale after */
                close(fd);
            }
        }
    }
}

void watch_on_inotify(struct conn *c)
{
    static uint8_t buf[65536] __attribute__((aligned(__alignof__(struct inotify_event))));
    if (c->dead || c->ino_fd < 0)
        return;
    for (int rounds = 0; rounds < 8 && c->reading; rounds++) {
        ssize_t n = read(c->ino_fd, buf, sizeof buf);
        if (n <= 0)
            break;
        for (ssize_t at = 0; at < n;) {
            const struct inotify_event *e = (const struct inotify_event *)(buf + at);
            handle_inotify_event(c, e);
            at += (ssize_t)(sizeof *e + e->len);
        }
        if (c->out.len - c->out_off > OUT_HIGH_WATER)
            break; /* the kernel queue holds the rest (and overflows if it must) */
    }
}

/* ---------------------------------------------------------------- PROBE_TCP */

struct probe {
    struct probe *next;
    struct ev ev;
    struct conn *c;
    uint32_t id;
    int fd;
    uint64_t deadline;
};

static void probe_finish(struct probe *p, int err)
{
    struct conn *c = p->c;
    if (err == 0)
        reply_ok(c, p->id);
    else
        reply_err(c, p->id, err, "127.0.0.1: %s", strerror(err));
    ep_del(p->fd);
    close(p->fd);
    for (struct probe **pp = &c->probes; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    c->nprobes--;
    free(p);
}

void h_probe_tcp(struct conn *c, const struct msg *m)
{
    int64_t port, timeout = 1000;
    if (msg_int(m, SA_TAG_PORT, &port) != 1 || port < 1 || port > 65535 ||
        msg_int(m, SA_TAG_TIMEOUT_MS, &timeout) < 0 || timeout < 0) {
        reply_err(c, m->id, EINVAL, "PROBE_TCP needs PORT 1..65535 and TIMEOUT_MS >= 0");
        return;
    }
    if (c->nprobes >= MAX_PROBES_PER_CONN) {
        reply_err(c, m->id, EMFILE, "too many probes in flight (max %d)", MAX_PROBES_PER_CONN);
        return;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        reply_err(c, m->id, errno, "socket: %s", strerror(errno));
        return;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno != EINPROGRESS) {
        int e = errno;
        bool ok = e == 0 || errno == EISCONN;
        close(fd);
        if (ok)
            reply_ok(c, m->id);
        else
            reply_err(c, m->id, e == ECONNREFUSED ? ECONNREFUSED : e, "127.0.0.1:%lld: %s",
                      (long long)port, strerror(e));
        return;
    }
    struct probe *p = calloc(1, sizeof *p);
    if (!p)
        xmalloc(SIZE_MAX);
    p->ev.kind = EV_PROBE;
    p->ev.obj = p;
    p->c = c;
    p->id = m->id;
    p->fd = fd;
    p->deadline = now_ms() + (uint64_t)timeout;
    p->next = c->probes;
    c->probes = p;
    c->nprobes++;
    ep_add(fd, EPOLLOUT, &p->ev);
}

void probe_on_event(struct ev *ev)
{
    struct probe *p = ev->obj;
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    probe_finish(p, err);
}

void probe_check_timeouts(struct conn *c, uint64_t now, int *next_ms)
{
    struct probe *p = c->probes;
    while (p) {
        struct probe *next = p->next;
        if (now >= p->deadline) {
            probe_finish(p, ETIMEDOUT);
        } else {
            uint64_t left = p->deadline - now;
            if (left > 3600000)
                left = 3600000; /* epoll_wait takes an int; waking hourly is harmless */
            if (*next_ms < 0 || left < (uint64_t)*next_ms)
                *next_ms = (int)left;
        }
        p = next;
    }
}

/* ---------------------------------------------------------------- connection end */

void files_conn_closed(struct conn *c)
{
    for (int i = 0; i < SA_LIMIT_MAX_HANDLES; i++)
        if (c->handles[i])
            handle_free(c, c->handles[i]);
    while (c->probes) {
        struct probe *p = c->probes;
        c->probes = p->next;
        ep_del(p->fd);
        close(p->fd);
        free(p);
    }
    for (size_t i = 0; i < c->nwrec; i++)
        free(c->wrecs[i].path);
    free(c->wrecs);
    c->wrecs = NULL;
    c->nwrec = 0;
    if (c->ino_fd >= 0) {
        ep_del(c->ino_fd);
        close(c->ino_fd); /* removes every watch with it */
        c->ino_fd = -1;
    }
}
