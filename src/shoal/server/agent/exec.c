/* shoal-agent: exec sessions (PROTOCOL.md "Exec").
 *
 * A session owns the process's pipes (or pty) and a buffer per output stream. Sessions are
 * global, so they outlive the connection that started them; requests that wait (READ, WAIT,
 * STDIN) are queued on the session as `struct pending` and dropped when their connection goes.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

struct pending {
    struct pending *next;
    struct conn *c;
    uint32_t id;
    uint64_t offset;
    uint32_t max;
    uint8_t *data; /* STDIN: the request's bytes (copied: the input buffer moves on) */
    size_t dlen;
    bool eof;
    bool exit_only; /* WAIT EXIT_ONLY: answered at the process's exit, its pipes open or not */
};

struct stream {
    struct ev ev;
    struct session *s;
    int fd;          /* -1 once ended */
    bool polling;
    bool eof;
    buf_t b;         /* b.p[skip..len) holds stream bytes [base, end) */
    size_t skip;
    uint64_t base, end, hi; /* hi: highest offset a READ asked for */
    struct pending *readers;
};

struct session {
    struct session *next;
    char id[MAX_EXEC_ID + 1];
    uint64_t seq;
    pid_t pid;
    bool exited, timed_out, forgotten;
    int code;
    uint64_t deadline; /* 0: none */
    struct stream out, err;
    /* stdin */
    struct ev in_ev;
    int in_fd;           /* -1 when NULL mode or closed */
    bool in_pipe;        /* the session has a stdin to write to at all */
    bool in_polling;
    bool in_closed;      /* the reader went away: accept and drop */
    bool in_eof;         /* EOF requested */
    bool in_eof_done;
    buf_t in;
    size_t in_skip;
    uint64_t accepted;
    struct pending *stdins; /* FIFO: head is served first */
    struct pending *waiters;
    int pty_fd;          /* master, for RESIZE; -1 without pty */
};

/* The descriptor limit the agent started with, restored in its children (it raises its own). */
struct rlimit g_child_nofile;
static struct session *g_sessions;
static int g_nsessions;
static uint64_t g_seq;
static struct session *g_graveyard; /* freed at the next loop turn: events may still name them */

static void session_check_done(struct session *s);

void exec_init(void) {}

/* Signals the session's process group. Right after fork the child may not have called
 * setsid() yet, so there is no group: then the leader itself is signalled. */
static int session_kill(struct session *s, int sig)
{
    if (kill(-s->pid, sig) == 0)
        return 0;
    return s->exited ? -1 : kill(s->pid, sig);
}

/* ---------------------------------------------------------------- pending requests */

static struct pending *pending_new(struct conn *c, uint32_t id)
{
    struct pending *p = calloc(1, sizeof *p);
    if (!p)
        xmalloc(SIZE_MAX);
    p->c = c;
    p->id = id;
    c->npending++;
    return p;
}

static void pending_free(struct pending *p)
{
    p->c->npending--;
    p->c->stdin_bytes -= p->dlen;
    free(p->data);
    free(p);
}

static void pending_append(struct pending **head, struct pending *p)
{
    while (*head)
        head = &(*head)->next;
    *head = p;
}

/* Drops (without reply) the requests of connection c, or all when c is NULL, replying
 * ESRCH when `reply` (the session went away). */
static void pending_drop(struct pending **head, struct conn *c, bool reply)
{
    while (*head) {
        struct pending *p = *head;
        if (c && p->c != c) {
            head = &p->next;
            continue;
        }
        *head = p->next;
        if (reply)
            reply_err(p->c, p->id, ESRCH, "the exec session was forgotten");
        pending_free(p);
    }
}

static bool too_many_pending(struct conn *c, uint32_t id)
{
    if (c->npending < SA_LIMIT_MAX_PENDING)
        return false;
    reply_err(c, id, EMFILE, "too many requests waiting on this connection (max %d)",
              SA_LIMIT_MAX_PENDING);
    return true;
}

/* ---------------------------------------------------------------- lookup and validation */

static bool valid_exec_id(const struct field *f)
{
    if (!f || f->len < 1 || f->len > MAX_EXEC_ID)
        return false;
    for (uint32_t i = 0; i < f->len; i++) {
        uint8_t ch = f->val[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return false;
    }
    return true;
}

static struct session *find_session(const struct field *f)
{
    for (struct session *s = g_sessions; s; s = s->next)
        if (strlen(s->id) == f->len && !memcmp(s->id, f->val, f->len))
            return s;
    return NULL;
}

/* The session a request names, or NULL after replying with the error. */
static struct session *session_arg(struct conn *c, const struct msg *m)
{
    const struct field *f = msg_get(m, SA_TAG_EXEC_ID);
    if (!valid_exec_id(f)) {
        reply_err(c, m->id, EINVAL, "EXEC_ID must be 1-64 bytes of [A-Za-z0-9_.-]");
        return NULL;
    }
    struct session *s = find_session(f);
    if (!s)
        reply_err(c, m->id, ESRCH, "no exec session %.*s", (int)f->len, (const char *)f->val);
    return s;
}

static bool session_done(const struct session *s)
{
    return s->exited && s->out.eof && s->err.eof;
}

/* ---------------------------------------------------------------- output streams */

static void stream_set_polling(struct stream *st, bool on)
{
    if (st->fd < 0 || st->polling == on)
        return;
    /* DEL rather than MOD to 0: epoll reports EPOLLHUP even with no events asked, which
     * would spin the loop while back-pressure holds a hung-up pipe. */
    if (on)
        ep_add(st->fd, EPOLLIN, &st->ev);
    else
        ep_del(st->fd);
    st->polling = on;
}

static void stream_end(struct stream *st)
{
    if (st->fd >= 0) {
        stream_set_polling(st, false);
        close(st->fd);
        st->fd = -1;
    }
    st->eof = true;
}

static uint64_t stream_room(const struct stream *st)
{
    uint64_t ahead = st->end - st->hi;
    return ahead >= SA_LIMIT_STREAM_BUFFER ? 0 : SA_LIMIT_STREAM_BUFFER - ahead;
}

/* Answers READ at `p->offset`; false when it must keep waiting. */
static bool stream_answer(struct stream *st, struct pending *p, int stream_no)
{
    if (p->offset < st->end) {
        uint64_t n = st->end - p->offset;
        if (n > p->max)
            n = p->max;
        size_t at = st->skip + (size_t)(p->offset - st->base);
        size_t s = fr_begin(p->c, SA_T_DATA, p->id);
        fr_int(p->c, SA_TAG_STREAM, stream_no);
        fr_int(p->c, SA_TAG_OFFSET, (int64_t)p->offset);
        fr_bytes(p->c, SA_TAG_DATA, st->b.p + at, (size_t)n);
        if (st->eof && p->offset + n == st->end)
            fr_int(p->c, SA_TAG_EOF, 1);
        fr_end(p->c, s);
        return true;
    }
    if (st->eof) {
        size_t s = fr_begin(p->c, SA_T_DATA, p->id);
        fr_int(p->c, SA_TAG_STREAM, stream_no);
        fr_int(p->c, SA_TAG_OFFSET, (int64_t)p->offset);
        fr_bytes(p->c, SA_TAG_DATA, NULL, 0);
        fr_int(p->c, SA_TAG_EOF, 1);
        fr_end(p->c, s);
        return true;
    }
    return false;
}

static void stream_serve(struct stream *st)
{
    int no = st == &st->s->out ? SA_STREAM_STDOUT : SA_STREAM_STDERR;
    struct pending **pp = &st->readers;
    while (*pp) {
        struct pending *p = *pp;
        if (stream_answer(st, p, no)) {
            *pp = p->next;
            pending_free(p);
        } else {
            pp = &p->next;
        }
    }
}

/* Forgets bytes older than the retain window and compacts the buffer now and then. */
static void stream_trim(struct stream *st)
{
    uint64_t keep_from = st->hi > SA_LIMIT_STREAM_RETAIN ? st->hi - SA_LIMIT_STREAM_RETAIN : 0;
    if (keep_from > st->base) {
        st->skip += (size_t)(keep_from - st->base);
        st->base = keep_from;
    }
    size_t live = st->b.len - st->skip;
    if (st->skip && (st->skip >= live || st->skip > (1u << 20))) {
        memmove(st->b.p, st->b.p + st->skip, live);
        st->b.len = live;
        st->skip = 0;
    }
    if (live == 0 && st->b.cap > 65536)
        buf_free(&st->b);
}

static void stream_read_some(struct stream *st)
{
    for (int rounds = 0; rounds < 16 && st->fd >= 0; rounds++) {
        uint64_t room = stream_room(st);
        if (room == 0)
            break;
        size_t want = room < 65536 ? (size_t)room : 65536;
        buf_reserve(&st->b, want);
        ssize_t n = read(st->fd, st->b.p + st->b.len, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n <= 0) { /* EOF, or EIO from a pty whose last slave closed */
            stream_end(st);
            break;
        }
        st->b.len += (size_t)n;
        st->end += (uint64_t)n;
        if ((size_t)n < want)
            break;
    }
    stream_set_polling(st, st->fd >= 0 && stream_room(st) > 0);
    stream_serve(st);
    if (st->eof)
        session_check_done(st->s);
}

void exec_on_stream(struct ev *ev, uint32_t events)
{
    (void)events;
    struct stream *st = ev->obj;
    if (st->s->forgotten)
        return;
    stream_read_some(st);
}

/* ---------------------------------------------------------------- stdin */

static void stdin_close(struct session *s)
{
    if (s->in_fd >= 0) {
        if (s->in_polling)
            ep_del(s->in_fd);
        s->in_polling = false;
        close(s->in_fd);
        s->in_fd = -1;
    }
}

static void stdin_serve(struct session *s);

static void stdin_set_polling(struct session *s)
{
    bool want = s->in_fd >= 0 && s->in.len > s->in_skip;
    if (want == s->in_polling)
        return;
    if (want)
        ep_add(s->in_fd, EPOLLOUT, &s->in_ev);
    else
        ep_del(s->in_fd);
    s->in_polling = want;
}

/* Writes buffered stdin to the process; sends EOF once the buffer is empty. */
static void stdin_flush(struct session *s)
{
    while (s->in_fd >= 0 && s->in.len > s->in_skip) {
        ssize_t n = write(s->in_fd, s->in.p + s->in_skip, s->in.len - s->in_skip);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n <= 0) { /* EPIPE: the reader is gone; later writes are dropped */
            s->in_closed = true;
            stdin_close(s);
            break;
        }
        s->in_skip += (size_t)n;
    }
    if (s->in.len == s->in_skip) {
        s->in.len = s->in_skip = 0;
        if (s->in.cap > 65536)
            buf_free(&s->in);
    }
    if (s->in_eof && !s->in_eof_done && s->in.len == s->in_skip) {
        s->in_eof_done = true;
        if (s->pty_fd >= 0 && s->in_fd >= 0) {
            /* A terminal has no half-close: EOF is the VEOF character, as typed. */
            static const char eot = 4;
            (void)!write(s->in_fd, &eot, 1);
        } else {
            stdin_close(s);
        }
    }
    stdin_set_polling(s);
}

/* Serves waiting STDIN requests in order while the buffer has room. */
static void stdin_serve(struct session *s)
{
    while (s->stdins) {
        struct pending *p = s->stdins;
        uint64_t skip = s->accepted > p->offset ? s->accepted - p->offset : 0;
        size_t fresh = skip < p->dlen ? p->dlen - (size_t)skip : 0;
        if (p->offset > s->accepted) {
            reply_err(p->c, p->id, EINVAL, "stdin offset %llu is past the %llu bytes accepted",
                      (unsigned long long)p->offset, (unsigned long long)s->accepted);
        } else if (s->in_eof && (fresh || !p->eof)) {
            reply_err(p->c, p->id, EINVAL, "stdin was already closed (EOF)");
        } else {
            bool drop = s->in_closed || s->in_fd < 0;
            size_t held = s->in.len - s->in_skip;
            if (!drop && fresh && held + fresh > SA_LIMIT_STDIN_BUFFER && held > 0)
                return; /* wait for the process to take some */
            if (fresh && !drop)
                buf_append(&s->in, p->data + skip, fresh);
            s->accepted += fresh;
            if (p->eof)
                s->in_eof = true;
            size_t r = fr_begin(p->c, SA_T_OK, p->id);
            fr_int(p->c, SA_TAG_OFFSET, (int64_t)s->accepted);
            fr_end(p->c, r);
        }
        s->stdins = p->next;
        pending_free(p);
        stdin_flush(s);
    }
}

void exec_on_stdin(struct ev *ev, uint32_t events)
{
    (void)events;
    struct session *s = ev->obj;
    if (s->forgotten)
        return;
    stdin_flush(s);
    stdin_serve(s);
}

/* ---------------------------------------------------------------- session life */

/* EXITED for the WAIT `p`; the streams' final lengths only once they are final. */
static void reply_exited(const struct session *s, struct pending *p)
{
    size_t r = fr_begin(p->c, SA_T_EXITED, p->id);
    fr_int(p->c, SA_TAG_CODE, s->code);
    if (s->timed_out)
        fr_int(p->c, SA_TAG_TIMED_OUT, 1);
    if (session_done(s)) {
        fr_int(p->c, SA_TAG_STDOUT_END, (int64_t)s->out.end);
        fr_int(p->c, SA_TAG_STDERR_END, (int64_t)s->err.end);
    }
    fr_end(p->c, r);
}

/* Answer the waiters that `all` or their EXIT_ONLY lets go now (the process has exited). */
static void answer_waiters(struct session *s, bool all)
{
    struct pending **at = &s->waiters;
    while (*at) {
        struct pending *p = *at;
        if (!all && !p->exit_only) {
            at = &p->next;
            continue;
        }
        *at = p->next;
        reply_exited(s, p);
        pending_free(p);
    }
}

static void session_check_done(struct session *s)
{
    if (s->exited)
        answer_waiters(s, false); /* EXIT_ONLY ones: a child may hold the pipes for long */
    if (!session_done(s))
        return;
    /* Nobody is left to read stdin or use the terminal: give the descriptors back now (a
     * finished session may be kept for a long time). */
    s->in_closed = true;
    stdin_close(s);
    if (s->pty_fd >= 0) {
        close(s->pty_fd);
        s->pty_fd = -1;
    }
    /* Every byte is readable and the process is gone: report the exit. */
    answer_waiters(s, true);
}

bool exec_on_child_exit(pid_t pid, int status)
{
    for (struct session *s = g_sessions; s; s = s->next) {
        if (s->pid != pid || s->exited)
            continue;
        s->exited = true;
        if (s->timed_out)
            s->code = 124;
        else if (WIFEXITED(status))
            s->code = WEXITSTATUS(status);
        else
            s->code = 128 + WTERMSIG(status);
        s->deadline = 0;
        /* Read what is left now: a pty master reports EIO once its last slave closes. */
        stream_read_some(&s->out);
        stream_read_some(&s->err);
        session_check_done(s);
        return true;
    }
    return false;
}

static void session_unlink(struct session *s)
{
    for (struct session **pp = &g_sessions; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    g_nsessions--;
}

/* Frees a session's resources now and its memory at the next loop turn. */
static void session_forget(struct session *s)
{
    if (!s->exited)
        session_kill(s, SIGKILL);
    s->forgotten = true;
    pending_drop(&s->out.readers, NULL, true);
    pending_drop(&s->err.readers, NULL, true);
    pending_drop(&s->waiters, NULL, true);
    pending_drop(&s->stdins, NULL, true);
    stream_end(&s->out);
    stream_end(&s->err);
    buf_free(&s->out.b);
    buf_free(&s->err.b);
    stdin_close(s);
    buf_free(&s->in);
    if (s->pty_fd >= 0)
        close(s->pty_fd);
    s->pty_fd = -1;
    session_unlink(s);
    s->next = g_graveyard;
    g_graveyard = s;
}

void exec_check_timeouts(uint64_t now, int *next_ms)
{
    while (g_graveyard) {
        struct session *s = g_graveyard;
        g_graveyard = s->next;
        free(s);
    }
    for (struct session *s = g_sessions; s; s = s->next) {
        if (!s->deadline || s->exited)
            continue;
        if (now >= s->deadline) {
            session_kill(s, SIGKILL);
            s->timed_out = true;
            s->deadline = 0;
            continue;
        }
        uint64_t left = s->deadline - now;
        if (left > 3600000)
            left = 3600000; /* epoll_wait takes an int; waking hourly is harmless */
        if (*next_ms < 0 || left < (uint64_t)*next_ms)
            *next_ms = (int)left;
    }
}

void exec_conn_closed(struct conn *c)
{
    for (struct session *s = g_sessions; s; s = s->next) {
        pending_drop(&s->out.readers, c, false);
        pending_drop(&s->err.readers, c, false);
        pending_drop(&s->waiters, c, false);
        pending_drop(&s->stdins, c, false);
    }
}

/* Makes room for one more session: forgets the oldest finished one that nobody waits on. */
static bool make_room(void)
{
    if (g_nsessions < SA_LIMIT_MAX_SESSIONS)
        return true;
    struct session *oldest = NULL;
    for (struct session *s = g_sessions; s; s = s->next)
        if (session_done(s) && (!oldest || s->seq < oldest->seq))
            oldest = s;
    if (!oldest)
        return false;
    session_forget(oldest);
    return true;
}

/* ---------------------------------------------------------------- the child */

static void child_fail(const char *a, const char *b, const char *c, int code)
{
    char line[MAX_PATH_BYTES * 2 + 128];
    int n = snprintf(line, sizeof line, "%s%s%s\n", a, b, c);
    if (n > (int)sizeof line - 1)
        n = (int)sizeof line - 1;
    (void)!write(2, line, (size_t)n);
    _exit(code);
}

/* execvpe as a shell does it, reporting the shell's messages and codes. */
static void child_exec(char **argv, char **envp)
{
    const char *name = argv[0];
    if (strchr(name, '/')) {
        execve(name, argv, envp);
        int e = errno;
        if (e == ENOENT || e == ENOTDIR)
            child_fail(name, ": No such file or directory", "", 127);
        if (e == EACCES || e == EISDIR || e == EPERM)
            child_fail(name, ": Permission denied", "", 126);
        child_fail(name, ": ", strerror(e), 126);
    }
    const char *path = DEFAULT_PATH;
    for (char **e = envp; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            path = *e + 5;
    bool denied = false;
    int other = 0;
    char full[MAX_PATH_BYTES * 2 + 2];
    size_t nlen = strlen(name);
    while (*name) {
        const char *colon = strchr(path, ':');
        size_t dlen = colon ? (size_t)(colon - path) : strlen(path);
        if (dlen + nlen + 2 <= sizeof full) {
            if (dlen) {
                memcpy(full, path, dlen);
                full[dlen] = '/';
                memcpy(full + dlen + 1, name, nlen + 1);
            } else {
                memcpy(full, name, nlen + 1); /* an empty PATH entry is the cwd */
            }
            /* A candidate that does not exist is skipped without an execve: under gVisor a
             * failed execve costs ~0.3 ms, a failed stat a tenth of that. Same answer. */
            struct stat st;
            if (stat(full, &st) == 0 || (errno != ENOENT && errno != ENOTDIR))
                execve(full, argv, envp);
            if (errno == EACCES || errno == EISDIR || errno == EPERM)
                denied = true;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ENAMETOOLONG)
                other = errno;
        }
        if (!colon)
            break;
        path = colon + 1;
    }
    if (denied)
        child_fail(name, ": Permission denied", "", 126);
    if (other)
        child_fail(name, ": ", strerror(other), 126);
    child_fail(name, ": command not found", "", 127);
}

struct exec_spec {
    char **argv, **envp;
    char *cwd;
    long uid, gid;
    int fd_in, fd_out, fd_err; /* the child's ends */
    int pty_slave;             /* -1 without pty */
};

int g_child_reset[64];
int g_nchild_reset;

/* Called once the agent's own dispositions are set (they never change afterwards). */
void child_reset_list_init(void)
{
    g_nchild_reset = 0;
    for (int s = 1; s < 65; s++) {
        struct sigaction sa;
        if (s == SIGKILL || s == SIGSTOP || sigaction(s, NULL, &sa) < 0)
            continue;
        if (sa.sa_handler != SIG_DFL)
            g_child_reset[g_nchild_reset++] = s;
    }
}

static void child_main(const struct exec_spec *x)
{
    sigset_t all;
    sigfillset(&all);
    /* Only what is not SIG_DFL already: under gVisor each sigaction costs ~18 us, and the 62
     * of a reset of every signal were ~1.1 ms of every exec. */
    for (int i = 0; i < g_nchild_reset; i++)
        signal(g_child_reset[i], SIG_DFL);
    sigprocmask(SIG_UNBLOCK, &all, NULL);
    setrlimit(RLIMIT_NOFILE, &g_child_nofile);
    setsid();
    if (x->pty_slave >= 0) {
        ioctl(x->pty_slave, TIOCSCTTY, 0);
        dup2(x->pty_slave, 0);
        dup2(x->pty_slave, 1);
        dup2(x->pty_slave, 2);
    } else {
        /* Move to 0,1,2 in an order that cannot clobber a source still needed. */
        int in = fcntl(x->fd_in, F_DUPFD_CLOEXEC, 3);
        int out = fcntl(x->fd_out, F_DUPFD_CLOEXEC, 3);
        int err = fcntl(x->fd_err, F_DUPFD_CLOEXEC, 3);
        dup2(in, 0);
        dup2(out, 1);
        dup2(err, 2);
    }
    if (setgroups(0, NULL) < 0 && errno != EPERM)
        child_fail("shoal: cannot clear supplementary groups: ", strerror(errno), "", 126);
    if (setgid((gid_t)x->gid) < 0)
        child_fail("shoal: cannot switch to the gid: ", strerror(errno), "", 126);
    if (setuid((uid_t)x->uid) < 0)
        child_fail("shoal: cannot switch to the uid: ", strerror(errno), "", 126);
    if (chdir(x->cwd) < 0) {
        char msg[MAX_PATH_BYTES + 64];
        snprintf(msg, sizeof msg, "shoal: cannot change to directory \"%s\": ", x->cwd);
        child_fail(msg, strerror(errno), "", 1);
    }
    child_exec(x->argv, x->envp);
}

/* ---------------------------------------------------------------- EXEC */

static char **collect_strings(const struct msg *m, uint16_t tag, int *count, bool *bad)
{
    int n = 0;
    for (int i = 0; i < m->nf; i++)
        if (m->f[i].tag == tag)
            n++;
    char **v = xmalloc(sizeof(char *) * (size_t)(n + 1));
    int k = 0;
    for (int i = 0; i < m->nf; i++) {
        if (m->f[i].tag != tag)
            continue;
        if (memchr(m->f[i].val, 0, m->f[i].len))
            *bad = true;
        v[k++] = xstrndup((const char *)m->f[i].val, m->f[i].len);
    }
    v[k] = NULL;
    *count = n;
    return v;
}

static void free_strings(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

static void close_if(int fd)
{
    if (fd >= 0)
        close(fd);
}

static void stream_init(struct stream *st, struct session *s, int fd)
{
    st->ev.kind = EV_STREAM;
    st->ev.obj = st;
    st->s = s;
    st->fd = fd;
    st->eof = fd < 0; /* NULL mode, or stderr sent to stdout: empty and ended at once */
    if (fd >= 0) {
        fcntl(fd, F_SETFL, O_NONBLOCK);
        stream_set_polling(st, true);
    }
}

/* An optional integer field within [lo, hi] (default lo when absent); false when invalid. */
static bool opt_int(const struct msg *m, uint16_t tag, int64_t lo, int64_t hi, int64_t *out)
{
    *out = lo;
    int r = msg_int(m, tag, out);
    return r == 0 || (r == 1 && *out >= lo && *out <= hi);
}

/* Validates EXEC's options into `x`; replies and returns false when one is wrong. */
static bool exec_options(struct conn *c, const struct msg *m, struct exec_spec *x, int modes[3],
                         int64_t *timeout, int64_t pty[2])
{
    static const uint16_t mode_tags[3] = {SA_TAG_STDIN_MODE, SA_TAG_STDOUT_MODE, SA_TAG_STDERR_MODE};
    static const char *mode_names[3] = {"STDIN_MODE", "STDOUT_MODE", "STDERR_MODE"};
    for (int i = 0; i < 3; i++) {
        int64_t v;
        if (!opt_int(m, mode_tags[i], 0, i == 2 ? SA_STDERR_MODE_STDOUT : SA_STDOUT_MODE_NULL, &v)) {
            reply_err(c, m->id, EINVAL, "bad %s", mode_names[i]);
            return false;
        }
        modes[i] = (int)v;
    }
    int64_t id;
    if (!opt_int(m, SA_TAG_UID, 0, 0xfffffffe, &id)) {
        reply_err(c, m->id, EINVAL, "UID must be 0..4294967294");
        return false;
    }
    x->uid = (long)id;
    if (!opt_int(m, SA_TAG_GID, 0, 0xfffffffe, &id)) {
        reply_err(c, m->id, EINVAL, "GID must be 0..4294967294");
        return false;
    }
    x->gid = (long)id;
    if (!opt_int(m, SA_TAG_TIMEOUT_MS, 0, INT64_MAX / 2, timeout)) {
        reply_err(c, m->id, EINVAL, "TIMEOUT_MS must be a non-negative integer");
        return false;
    }
    int rr = msg_int(m, SA_TAG_PTY_ROWS, &pty[0]), rc = msg_int(m, SA_TAG_PTY_COLS, &pty[1]);
    if (rr < 0 || rc < 0 || rr != rc || (rr == 1 && (pty[0] < 1 || pty[0] > 65535 || pty[1] < 1 || pty[1] > 65535))) {
        reply_err(c, m->id, EINVAL, "PTY_ROWS and PTY_COLS go together, each 1..65535");
        return false;
    }
    if (rr == 0)
        pty[0] = pty[1] = 0;
    const struct field *cwd = msg_get(m, SA_TAG_CWD);
    if (cwd && (cwd->len == 0 || cwd->len > MAX_PATH_BYTES || memchr(cwd->val, 0, cwd->len))) {
        reply_err(c, m->id, EINVAL, "CWD must be 1-4096 bytes without NUL");
        return false;
    }
    x->cwd = cwd ? xstrndup((const char *)cwd->val, cwd->len) : xstrndup("/", 1);
    return true;
}

/* Opens the parent's ends (and the child's) for one exec; false with errno set. */
static bool exec_fds(const int modes[3], bool pty, struct exec_spec *x, int mine[3], int *master)
{
    int devnull = -1;
    mine[0] = mine[1] = mine[2] = -1;
    x->fd_in = x->fd_out = x->fd_err = x->pty_slave = -1;
    *master = -1;
    if (pty) {
        int mfd = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (mfd < 0 || grantpt(mfd) < 0 || unlockpt(mfd) < 0) {
            int e = errno;
            close_if(mfd);
            errno = e;
            return false;
        }
        char name[64];
        if (ptsname_r(mfd, name, sizeof name) != 0 ||
            (x->pty_slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
            int e = errno;
            close(mfd);
            errno = e;
            return false;
        }
        *master = mfd;
        mine[1] = fcntl(mfd, F_DUPFD_CLOEXEC, 3);
        mine[0] = modes[0] == SA_STDIN_MODE_NULL ? -1 : fcntl(mfd, F_DUPFD_CLOEXEC, 3);
        return true;
    }
    for (int i = 0; i < 3; i++) {
        int *child = i == 0 ? &x->fd_in : i == 1 ? &x->fd_out : &x->fd_err;
        if (i == 2 && modes[2] == SA_STDERR_MODE_STDOUT) {
            *child = x->fd_out;
            continue;
        }
        if (modes[i] == SA_STDOUT_MODE_NULL) {
            if (devnull < 0 && (devnull = open("/dev/null", O_RDWR | O_CLOEXEC)) < 0)
                goto fail;
            *child = devnull;
            continue;
        }
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0)
            goto fail;
        mine[i] = i == 0 ? p[1] : p[0];
        *child = i == 0 ? p[0] : p[1];
    }
    return true;
fail:;
    int e = errno;
    for (int i = 0; i < 3; i++)
        close_if(mine[i]);
    if (x->fd_in != devnull)
        close_if(x->fd_in);
    if (x->fd_out != devnull)
        close_if(x->fd_out);
    if (x->fd_err != devnull && x->fd_err != x->fd_out)
        close_if(x->fd_err);
    close_if(devnull);
    errno = e;
    return false;
}

static void close_child_ends(struct exec_spec *x)
{
    int fds[4] = {x->fd_in, x->fd_out, x->fd_err, x->pty_slave};
    for (int i = 0; i < 4; i++) {
        bool seen = false;
        for (int j = 0; j < i; j++)
            seen |= fds[j] == fds[i];
        if (!seen)
            close_if(fds[i]);
    }
}

void h_exec(struct conn *c, const struct msg *m)
{
    const struct field *idf = msg_get(m, SA_TAG_EXEC_ID);
    if (!valid_exec_id(idf)) {
        reply_err(c, m->id, EINVAL, "EXEC_ID must be 1-64 bytes of [A-Za-z0-9_.-]");
        return;
    }
    if (find_session(idf)) {
        reply_err(c, m->id, EEXIST, "exec id %.*s is in use", (int)idf->len, (const char *)idf->val);
        return;
    }
    struct exec_spec x = {0};
    int modes[3];
    int64_t timeout, pty[2];
    if (!exec_options(c, m, &x, modes, &timeout, pty))
        return;
    int nargs, nenv;
    bool bad = false;
    x.argv = collect_strings(m, SA_TAG_ARG, &nargs, &bad);
    x.envp = collect_strings(m, SA_TAG_ENV, &nenv, &bad);
    int mine[3], master = -1;
    if (nargs < 1 || bad) {
        reply_err(c, m->id, EINVAL, "EXEC needs at least one ARG; ARG and ENV hold no NUL");
        goto out;
    }
    if (!make_room()) {
        reply_err(c, m->id, EMFILE, "too many live exec sessions (max %d)", SA_LIMIT_MAX_SESSIONS);
        goto out;
    }
    if (!exec_fds(modes, pty[0] > 0, &x, mine, &master)) {
        reply_err(c, m->id, errno, "cannot set up the process's stdio: %s", strerror(errno));
        goto out;
    }
    if (master >= 0) {
        struct winsize ws = {.ws_row = (unsigned short)pty[0], .ws_col = (unsigned short)pty[1]};
        ioctl(master, TIOCSWINSZ, &ws);
    }
    /* vfork: the child borrows the agent's memory until it execs, so no address space is
     * copied. Under gVisor a fork costs a new address space (a host stub process): fork + exec
     * took ~20 ms there, vfork + exec ~7 ms. The child only makes system calls on its own stack
     * and exits or execs (child_main); signals stay blocked until it has reset every handler, so
     * no agent handler ever runs in it. */
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    pid_t pid = vfork();
    if (pid == 0)
        child_main(&x);
    int fork_errno = errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    errno = fork_errno;
    if (pid < 0) {
        int e = errno;
        for (int i = 0; i < 3; i++)
            close_if(mine[i]);
        close_if(master);
        close_child_ends(&x);
        reply_err(c, m->id, e == EAGAIN ? EMFILE : e, "fork: %s", strerror(e));
        goto out;
    }
    close_child_ends(&x);

    struct session *s = calloc(1, sizeof *s);
    if (!s)
        xmalloc(SIZE_MAX);
    memcpy(s->id, idf->val, idf->len);
    s->seq = ++g_seq;
    s->pid = pid;
    s->pty_fd = master;
    s->deadline = timeout > 0 ? now_ms() + (uint64_t)timeout : 0;
    stream_init(&s->out, s, mine[1]);
    stream_init(&s->err, s, master >= 0 ? -1 : mine[2]);
    s->in_ev.kind = EV_STDIN;
    s->in_ev.obj = s;
    s->in_fd = mine[0];
    s->in_pipe = mine[0] >= 0;
    if (s->in_fd >= 0)
        fcntl(s->in_fd, F_SETFL, O_NONBLOCK);
    s->next = g_sessions;
    g_sessions = s;
    g_nsessions++;

    size_t r = fr_begin(c, SA_T_OK, m->id);
    fr_int(c, SA_TAG_PID, pid);
    fr_end(c, r);
out:
    free_strings(x.argv);
    free_strings(x.envp);
    free(x.cwd);
}

/* ---------------------------------------------------------------- the other requests */

void h_read(struct conn *c, const struct msg *m)
{
    struct session *s = session_arg(c, m);
    if (!s)
        return;
    int64_t stream_no, offset, max = SA_LIMIT_MAX_DATA;
    if (msg_int(m, SA_TAG_STREAM, &stream_no) != 1 ||
        (stream_no != SA_STREAM_STDOUT && stream_no != SA_STREAM_STDERR)) {
        reply_err(c, m->id, EINVAL, "STREAM must be STDOUT (1) or STDERR (2)");
        return;
    }
    if (msg_int(m, SA_TAG_OFFSET, &offset) != 1 || offset < 0 || msg_int(m, SA_TAG_MAX, &max) < 0 ||
        max < 1) {
        reply_err(c, m->id, EINVAL, "READ needs OFFSET >= 0 and MAX >= 1");
        return;
    }
    if (max > SA_LIMIT_MAX_DATA)
        max = SA_LIMIT_MAX_DATA;
    struct stream *st = stream_no == SA_STREAM_STDOUT ? &s->out : &s->err;
    if ((uint64_t)offset < st->base) {
        reply_err(c, m->id, ERANGE, "offset %lld is no longer held (oldest held: %llu)",
                  (long long)offset, (unsigned long long)st->base);
        return;
    }
    if ((uint64_t)offset > st->end) {
        reply_err(c, m->id, EINVAL, "offset %lld is past the %llu bytes written so far",
                  (long long)offset, (unsigned long long)st->end);
        return;
    }
    if ((uint64_t)offset > st->hi) {
        st->hi = (uint64_t)offset;
        stream_trim(st);
    }
    struct pending tmp = {.c = c, .id = m->id, .offset = (uint64_t)offset, .max = (uint32_t)max};
    if (!stream_answer(st, &tmp, (int)stream_no)) {
        if (too_many_pending(c, m->id))
            return;
        struct pending *p = pending_new(c, m->id);
        p->offset = tmp.offset;
        p->max = tmp.max;
        pending_append(&st->readers, p);
    }
    /* The host caught up: there may be room to read the pipe again. */
    if (st->fd >= 0 && !st->polling && stream_room(st) > 0)
        stream_set_polling(st, true);
}

void h_wait(struct conn *c, const struct msg *m)
{
    struct session *s = session_arg(c, m);
    int64_t exit_only = 0;
    if (!s || msg_int(m, SA_TAG_EXIT_ONLY, &exit_only) < 0) {
        if (s)
            reply_err(c, m->id, EINVAL, "EXIT_ONLY must be an integer");
        return;
    }
    if (too_many_pending(c, m->id))
        return;
    struct pending *p = pending_new(c, m->id);
    p->exit_only = exit_only != 0;
    pending_append(&s->waiters, p);
    session_check_done(s);
}

void h_stdin(struct conn *c, const struct msg *m)
{
    struct session *s = session_arg(c, m);
    if (!s)
        return;
    int64_t offset;
    const struct field *data = msg_get(m, SA_TAG_DATA);
    if (msg_int(m, SA_TAG_OFFSET, &offset) != 1 || offset < 0) {
        reply_err(c, m->id, EINVAL, "STDIN needs OFFSET >= 0");
        return;
    }
    if (!s->in_pipe) {
        reply_err(c, m->id, EINVAL, "exec %s has no stdin (STDIN_MODE is NULL)", s->id);
        return;
    }
    if (data && data->len > SA_LIMIT_MAX_DATA) {
        reply_err(c, m->id, EINVAL, "DATA is over max_data");
        return;
    }
    if (too_many_pending(c, m->id))
        return;
    if (data && c->stdin_bytes + data->len > 16 * (size_t)SA_LIMIT_STDIN_BUFFER) {
        reply_err(c, m->id, EMFILE, "too much stdin waiting on this connection");
        return;
    }
    struct pending *p = pending_new(c, m->id);
    p->offset = (uint64_t)offset;
    p->eof = msg_flag(m, SA_TAG_EOF);
    if (data && data->len) {
        p->data = xmalloc(data->len);
        memcpy(p->data, data->val, data->len);
        p->dlen = data->len;
        c->stdin_bytes += data->len;
    }
    pending_append(&s->stdins, p);
    stdin_serve(s);
}

void h_signal(struct conn *c, const struct msg *m)
{
    struct session *s = session_arg(c, m);
    if (!s)
        return;
    int64_t sig;
    if (msg_int(m, SA_TAG_SIGNO, &sig) != 1 || sig < 1 || sig > 64) {
        reply_err(c, m->id, EINVAL, "SIGNO must be 1..64");
        return;
    }
    /* Until the session is complete the group is known to be ours (its members hold the
     * pgid); after that the number may name someone else. */
    if (session_done(s) || session_kill(s, (int)sig) < 0) {
        reply_err(c, m->id, ESRCH, "the process of exec %s has exited", s->id);
        return;
    }
    reply_ok(c, m->id);
}

void h_resize(struct conn *c, const struct msg *m)
{
    struct session *s = session_arg(c, m);
    if (!s)
        return;
    int64_t rows, cols;
    if (msg_int(m, SA_TAG_PTY_ROWS, &rows) != 1 || msg_int(m, SA_TAG_PTY_COLS, &cols) != 1 ||
        rows < 1 || rows > 65535 || cols < 1 || cols > 65535) {
        reply_err(c, m->id, EINVAL, "RESIZE needs PTY_ROWS and PTY_COLS, each 1..65535");
        return;
    }
    if (s->pty_fd < 0) {
        reply_err(c, m->id, EINVAL, "exec %s has no pty", s->id);
        return;
    }
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    if (ioctl(s->pty_fd, TIOCSWINSZ, &ws) < 0) { /* the kernel sends SIGWINCH */
        reply_err(c, m->id, errno, "resize: %s", strerror(errno));
        return;
    }
    reply_ok(c, m->id);
}

void h_forget(struct conn *c, const struct msg *m)
{
    struct session *s = session_arg(c, m);
    if (!s)
        return;
    session_forget(s);
    reply_ok(c, m->id);
}

void h_list_execs(struct conn *c, const struct msg *m)
{
    size_t r = fr_begin(c, SA_T_OK, m->id);
    for (struct session *s = g_sessions; s; s = s->next) {
        size_t e = fr_nest_begin(c, SA_TAG_ENTRY);
        fr_str(c, SA_TAG_EXEC_ID, s->id);
        fr_int(c, SA_TAG_PID, s->pid);
        fr_int(c, SA_TAG_STATE, s->exited ? SA_STATE_EXITED : SA_STATE_RUNNING);
        if (s->exited)
            fr_int(c, SA_TAG_CODE, s->code);
        fr_nest_end(c, e);
    }
    fr_end(c, r);
}
