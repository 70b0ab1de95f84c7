/* shoal-agent: the in-sandbox agent (PID 1 of every sandbox).
 *
 * One thread, one epoll loop. Nothing here ever blocks on a descriptor the sandbox controls:
 * pipes are non-blocking, files are opened O_PATH first and type-checked (files.c), and every
 * queue is bounded. The wire format is PROTOCOL.md; numbers come from protocol.h.
 *
 * This file: start-up, the loop, connections and framing, the entry-point and signals.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

int g_epfd = -1;

static struct conn *g_conns[SA_LIMIT_MAX_CONNECTIONS];
static int g_listen_fd = -1;
static struct ev g_listen_ev = {EV_LISTEN, NULL};
static int g_sig_fd = -1;
/* A spare descriptor: when accept fails with EMFILE it is closed to accept and drop the
 * connection, so the listener does not stay readable and spin the loop. */
static int g_reserve_fd = -1;
static struct ev g_sig_ev = {EV_SIGNAL, NULL};
/* QUIESCE (PROTOCOL.md "Checkpoints"): the socket path, to listen again; a quiesce asked for
 * (done at the loop top, once the OK is sent); and while quiesced, when to listen again anyway. */
static const char *g_sock_path;
static bool g_quiesce_pending;
static uint64_t g_quiesce_ms;
static uint64_t g_relisten_at; /* 0: not quiesced */

/* Signals forwarded to the entry-point's process group (PROTOCOL.md "Starting"). */
static const int g_forward[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2};

/* ---------------------------------------------------------------- small utilities */

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        /* Out of memory in the agent: nothing sensible is left to do; the sandbox ends. */
        static const char m[] = "shoal-agent: out of memory\n";
        (void)!write(2, m, sizeof m - 1);
        _exit(125);
    }
    return p;
}

char *xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

void buf_reserve(buf_t *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p)
        xmalloc(SIZE_MAX); /* reports and exits */
    b->p = p;
    b->cap = cap;
}

void buf_append(buf_t *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
}

void buf_free(buf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int ep_add(int fd, uint32_t events, struct ev *ev)
{
    struct epoll_event e = {.events = events, .data.ptr = ev};
    return epoll_ctl(g_epfd, EPOLL_CTL_ADD, fd, &e);
}

int ep_mod(int fd, uint32_t events, struct ev *ev)
{
    struct epoll_event e = {.events = events, .data.ptr = ev};
    return epoll_ctl(g_epfd, EPOLL_CTL_MOD, fd, &e);
}

void ep_del(int fd)
{
    epoll_ctl(g_epfd, EPOLL_CTL_DEL, fd, NULL);
}

static void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* ---------------------------------------------------------------- request fields */

const struct field *msg_get(const struct msg *m, uint16_t tag)
{
    for (int i = 0; i < m->nf; i++)
        if (m->f[i].tag == tag)
            return &m->f[i];
    return NULL;
}

int msg_int(const struct msg *m, uint16_t tag, int64_t *out)
{
    const struct field *f = msg_get(m, tag);
    if (!f)
        return 0;
    if (f->len != 8)
        return -1;
    *out = (int64_t)get_le(f->val, 8);
    return 1;
}

bool msg_flag(const struct msg *m, uint16_t tag)
{
    int64_t v = 0;
    return msg_int(m, tag, &v) == 1 && v != 0;
}

/* ---------------------------------------------------------------- reply frames */

size_t fr_begin(struct conn *c, uint8_t type, uint32_t id)
{
    size_t start = c->out.len;
    uint8_t h[9];
    put_le(h, 0, 4); /* patched by fr_end */
    h[4] = type;
    put_le(h + 5, id, 4);
    buf_append(&c->out, h, 9);
    return start;
}

void fr_bytes(struct conn *c, uint16_t tag, const void *p, size_t n)
{
    uint8_t h[6];
    put_le(h, tag, 2);
    put_le(h + 2, n, 4);
    buf_append(&c->out, h, 6);
    buf_append(&c->out, p, n);
}

void fr_int(struct conn *c, uint16_t tag, int64_t v)
{
    uint8_t b[8];
    put_le(b, (uint64_t)v, 8);
    fr_bytes(c, tag, b, 8);
}

void fr_str(struct conn *c, uint16_t tag, const char *s)
{
    fr_bytes(c, tag, s, strlen(s));
}

size_t fr_nest_begin(struct conn *c, uint16_t tag)
{
    size_t pos = c->out.len;
    fr_bytes(c, tag, NULL, 0);
    return pos;
}

void fr_nest_end(struct conn *c, size_t pos)
{
    put_le(c->out.p + pos + 2, c->out.len - pos - 6, 4);
}

void fr_end(struct conn *c, size_t start)
{
    put_le(c->out.p + start, c->out.len - start - 4, 4);
    conn_out_changed(c);
}

void reply_ok(struct conn *c, uint32_t id)
{
    fr_end(c, fr_begin(c, SA_T_OK, id));
}

void reply_err(struct conn *c, uint32_t id, int err, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t s = fr_begin(c, SA_T_ERROR, id);
    fr_int(c, SA_TAG_ERRNO, err);
    fr_str(c, SA_TAG_MESSAGE, msg);
    fr_end(c, s);
}

/* ---------------------------------------------------------------- connections */

static void conn_update_epoll(struct conn *c)
{
    uint32_t want = 0;
    if (c->reading)
        want |= EPOLLIN;
    if (c->out.len > c->out_off)
        want |= EPOLLOUT;
    if (want != c->ep_events && !c->dead) {
        ep_mod(c->fd, want, &c->ev);
        c->ep_events = want;
    }
}

static void conn_flush(struct conn *c)
{
    while (!c->dead && c->out.len > c->out_off) {
        ssize_t n = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                c->dead = true;
            break;
        }
        c->out_off += (size_t)n;
    }
    if (c->out_off == c->out.len) {
        c->out.len = c->out_off = 0;
        if (c->out.cap > (1u << 20)) /* give back a burst's memory */
            buf_free(&c->out);
    } else if (c->out_off > (1u << 20) && c->out_off * 2 > c->out.len) {
        memmove(c->out.p, c->out.p + c->out_off, c->out.len - c->out_off);
        c->out.len -= c->out_off;
        c->out_off = 0;
    }
    bool over = c->out.len - c->out_off > OUT_HIGH_WATER;
    c->reading = !over;
    watch_update_polling(c);
    conn_update_epoll(c);
}

/* Called whenever a frame was queued: send what the socket takes now. */
void conn_out_changed(struct conn *c)
{
    (void)c; /* flushed in bulk by the loop (conn_flush_all) so replies batch per wake-up */
}

static void conn_flush_all(void)
{
    for (int i = 0; i < SA_LIMIT_MAX_CONNECTIONS; i++)
        if (g_conns[i] && g_conns[i]->out.len > g_conns[i]->out_off)
            conn_flush(g_conns[i]);
}

static void conn_free(int slot)
{
    struct conn *c = g_conns[slot];
    exec_conn_closed(c);
    files_conn_closed(c);
    ep_del(c->fd);
    close(c->fd);
    buf_free(&c->in);
    buf_free(&c->out);
    free(c);
    g_conns[slot] = NULL;
}

static void conns_reap_dead(void)
{
    for (int i = 0; i < SA_LIMIT_MAX_CONNECTIONS; i++)
        if (g_conns[i] && g_conns[i]->dead)
            conn_free(i);
}

static void on_accept(void)
{
    for (;;) {
        int fd = accept4(g_listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0 && (errno == EMFILE || errno == ENFILE) && g_reserve_fd >= 0) {
            close(g_reserve_fd);
            fd = accept4(g_listen_fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0)
                close(fd);
            g_reserve_fd = open("/", O_PATH | O_CLOEXEC);
            continue;
        }
        if (fd < 0)
            return; /* EAGAIN, or a transient error: the listener stays */
        int slot = -1;
        for (int i = 0; i < SA_LIMIT_MAX_CONNECTIONS; i++)
            if (!g_conns[i]) {
                slot = i;
                break;
            }
        if (slot < 0) {
            close(fd); /* max_connections reached: closed at once */
            continue;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->ev.kind = EV_CONN;
        c->ev.obj = c;
        c->reading = true;
        c->ep_events = EPOLLIN;
        c->next_handle = 1;
        c->ino_fd = -1;
        c->ino_ev.kind = EV_INOTIFY;
        c->ino_ev.obj = c;
        if (ep_add(fd, EPOLLIN, &c->ev) < 0) {
            close(fd);
            free(c);
            continue;
        }
        g_conns[slot] = c;
    }
}

static void h_hello(struct conn *c, const struct msg *m)
{
    int64_t v = 0;
    if (msg_int(m, SA_TAG_VERSION, &v) != 1 || v != SA_VERSION) {
        reply_err(c, m->id, EPROTO, "this agent speaks protocol version %d", SA_VERSION);
        c->hello = false;
        c->dead = true; /* after the reply is flushed: see conn_finish_dead */
        return;
    }
    c->hello = true;
    size_t s = fr_begin(c, SA_T_HELLO, m->id);
    fr_int(c, SA_TAG_VERSION, SA_VERSION);
    fr_str(c, SA_TAG_AGENT, AGENT_VERSION_STRING);
    fr_int(c, SA_TAG_PID, getpid());
    fr_end(c, s);
}

static void h_quiesce(struct conn *c, const struct msg *m);
static void h_resize_entry(struct conn *c, const struct msg *m);

typedef void (*handler_fn)(struct conn *, const struct msg *);

static handler_fn handler_for(uint8_t type)
{
    switch (type) {
    case SA_T_EXEC: return h_exec;
    case SA_T_READ: return h_read;
    case SA_T_WAIT: return h_wait;
    case SA_T_STDIN: return h_stdin;
    case SA_T_SIGNAL: return h_signal;
    case SA_T_RESIZE: return h_resize;
    case SA_T_FORGET: return h_forget;
    case SA_T_LIST_EXECS: return h_list_execs;
    case SA_T_STAT: return h_stat;
    case SA_T_LIST: return h_list;
    case SA_T_READ_FILE: return h_read_file;
    case SA_T_WRITE_BEGIN: return h_write_begin;
    case SA_T_WRITE_CHUNK: return h_write_chunk;
    case SA_T_WRITE_COMMIT: return h_write_commit;
    case SA_T_WRITE_ABORT: return h_write_abort;
    case SA_T_MKDIR: return h_mkdir;
    case SA_T_REMOVE: return h_remove;
    case SA_T_RENAME: return h_rename;
    case SA_T_H_OPEN: return h_hopen;
    case SA_T_H_READ: return h_hread;
    case SA_T_H_WRITE: return h_hwrite;
    case SA_T_H_SEEK: return h_hseek;
    case SA_T_H_FLUSH: return h_hflush;
    case SA_T_H_CLOSE: return h_hclose;
    case SA_T_WATCH: return h_watch;
    case SA_T_UNWATCH: return h_unwatch;
    case SA_T_PROBE_TCP: return h_probe_tcp;
    case SA_T_QUIESCE: return h_quiesce;
    case SA_T_RESIZE_ENTRY: return h_resize_entry;
    default: return NULL;
    }
}

/* Parses the fields of one payload. False on a protocol error (the connection is closed). */
static bool parse_fields(const uint8_t *p, size_t n, struct field *out, int *nf)
{
    int k = 0;
    size_t at = 0;
    while (at < n) {
        if (k >= SA_MAX_FIELDS || n - at < 6)
            return false;
        uint32_t len = (uint32_t)get_le(p + at + 2, 4);
        if (len > n - at - 6)
            return false;
        out[k].tag = (uint16_t)get_le(p + at, 2);
        out[k].len = len;
        out[k].val = p + at + 6;
        k++;
        at += 6 + len;
    }
    *nf = k;
    return true;
}

static void dispatch(struct conn *c, const struct msg *m)
{
    if (!c->hello) {
        if (m->type == SA_T_HELLO) {
            h_hello(c, m);
        } else {
            reply_err(c, m->id, EPROTO, "the first frame must be HELLO");
            c->dead = true;
        }
        return;
    }
    if (m->type == SA_T_HELLO) {
        reply_err(c, m->id, EPROTO, "HELLO was already received");
        return;
    }
    handler_fn h = handler_for(m->type);
    if (!h) {
        reply_err(c, m->id, ENOSYS, "unknown message type %u", m->type);
        return;
    }
    h(c, m);
}

/* Reads what the socket has and handles every complete frame in it. */
static void on_conn_readable(struct conn *c)
{
    static struct field fields[SA_MAX_FIELDS];
    for (int rounds = 0; rounds < 16 && c->reading && !c->dead; rounds++) {
        buf_reserve(&c->in, 65536);
        ssize_t n = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            c->dead = true;
            break;
        }
        if (n < 0)
            break;
        c->in.len += (size_t)n;
        size_t at = 0;
        while (!c->dead && c->in.len - at >= 4) {
            uint32_t flen = (uint32_t)get_le(c->in.p + at, 4);
            if (flen < 5 || flen - 5 > SA_MAX_PAYLOAD) {
                c->dead = true; /* malformed: the sender is not a well-behaved host */
                break;
            }
            if (c->in.len - at - 4 < flen) {
                buf_reserve(&c->in, flen + 4 - (c->in.len - at));
                break;
            }
            const uint8_t *fp = c->in.p + at + 4;
            struct msg m = {.type = fp[0], .id = (uint32_t)get_le(fp + 1, 4), .f = fields};
            if (!parse_fields(fp + 5, flen - 5, fields, &m.nf)) {
                c->dead = true;
                break;
            }
            dispatch(c, &m);
            at += 4 + flen;
        }
        if (at) {
            memmove(c->in.p, c->in.p + at, c->in.len - at);
            c->in.len -= at;
        }
        if (c->in.len == 0 && c->in.cap > (2u << 20))
            buf_free(&c->in);
        if (c->out.len - c->out_off > OUT_HIGH_WATER)
            break; /* conn_flush decides whether to keep reading */
        if ((size_t)n < 65536)
            break;
    }
}

/* A connection marked dead by a protocol-level refusal still gets its last reply if the
 * socket takes it without waiting. */
static void conn_finish_dead(void)
{
    for (int i = 0; i < SA_LIMIT_MAX_CONNECTIONS; i++) {
        struct conn *c = g_conns[i];
        if (c && c->dead && c->out.len > c->out_off)
            (void)!send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off,
                        MSG_NOSIGNAL | MSG_DONTWAIT);
    }
}

/* ---------------------------------------------------------------- the entry-point */

/* With --pty the entry-point runs on a pseudo-terminal: fds[0] reads its master (everything the
 * program writes), fds[1] stays -1, and our own stdin (the host's pipe) is copied to the master
 * through `in`, a bounded buffer: the host's pipe blocks while the program does not read. */
#define ENTRY_IN_MAX 65536

static struct {
    pid_t pid;
    int fds[2];        /* read ends of its stdout and stderr pipes, -1 once ended */
    struct ev evs[2];
    uint64_t written[2];
    bool capped[2];
    uint64_t limit;
    unsigned short pty_rows, pty_cols; /* --pty; 0: pipes */
    int pty_fd;        /* the master, for stdin and RESIZE_ENTRY; -1 without a pty */
    struct ev in_ev, pty_ev;
    buf_t in;          /* read from fd 0, not yet written to the master: in.p[in_off..in.len) */
    size_t in_off;
    bool in_polling, pty_polling, in_eof;
} g_entry = {.pid = -1, .fds = {-1, -1}, .limit = 64ull << 20, .pty_fd = -1};

static void write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return; /* the log is gone: drop, never block the entry-point */
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Copies the entry-point's output to ours (the host's log), up to the log limit per stream. */
static void entry_copy(int which, bool drain_only_available)
{
    static uint8_t chunk[65536];
    int fd = g_entry.fds[which];
    for (int rounds = 0; fd >= 0 && rounds < 64; rounds++) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
            ep_del(fd);
            close(fd);
            g_entry.fds[which] = -1;
            return;
        }
        if (n < 0)
            return;
        int out = which == 0 ? 1 : 2;
        uint64_t room = g_entry.limit - g_entry.written[which];
        size_t keep = (uint64_t)n < room ? (size_t)n : (size_t)room;
        write_all(out, chunk, keep);
        g_entry.written[which] += keep;
        if (keep < (size_t)n && !g_entry.capped[which]) {
            char line[128];
            int k = snprintf(line, sizeof line,
                             "\n[shoal: output limit of %llu bytes reached; the rest is dropped]\n",
                             (unsigned long long)g_entry.limit);
            write_all(out, (const uint8_t *)line, (size_t)k);
            g_entry.capped[which] = true;
        }
        (void)drain_only_available;
    }
}

static void child_reset_signals(void)
{
    sigset_t all;
    sigfillset(&all);
    for (int s = 1; s < 65; s++)
        if (s != SIGKILL && s != SIGSTOP)
            signal(s, SIG_DFL);
    sigprocmask(SIG_UNBLOCK, &all, NULL);
}

static void die_msg(const char *a, const char *b, const char *c, int code)
{
    char line[MAX_PATH_BYTES + 256];
    int n = snprintf(line, sizeof line, "%s%s%s\n", a, b, c);
    if (n > (int)sizeof line - 1)
        n = (int)sizeof line - 1;
    (void)!write(2, line, (size_t)n);
    _exit(code);
}

/* Stdin to the terminal: poll fd 0 while `in` has room, the master while `in` has bytes. Each
 * is registered only while wanted: a closed pipe or a terminal whose slave closed reports
 * EPOLLHUP whatever the mask, which would spin the loop. */
static void entry_in_polling(void)
{
    bool want_in = !g_entry.in_eof && g_entry.in.len - g_entry.in_off < ENTRY_IN_MAX;
    if (want_in != g_entry.in_polling) {
        if (!want_in) {
            ep_del(0);
        } else if (ep_add(0, EPOLLIN, &g_entry.in_ev) < 0) {
            /* Not pollable (/dev/null, a file): nothing to copy, and no EOF to type either. */
            g_entry.in_eof = true;
            want_in = false;
        }
        g_entry.in_polling = want_in;
    }
    bool want_out = g_entry.in.len > g_entry.in_off;
    if (want_out != g_entry.pty_polling) {
        if (want_out)
            ep_add(g_entry.pty_fd, EPOLLOUT, &g_entry.pty_ev);
        else
            ep_del(g_entry.pty_fd);
        g_entry.pty_polling = want_out;
    }
}

static void entry_in_flush(void)
{
    while (g_entry.in.len > g_entry.in_off) {
        ssize_t n = write(g_entry.pty_fd, g_entry.in.p + g_entry.in_off,
                          g_entry.in.len - g_entry.in_off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n <= 0) { /* EIO: no slave open any more; what the host sends is dropped */
            g_entry.in_off = g_entry.in.len;
            break;
        }
        g_entry.in_off += (size_t)n;
    }
    if (g_entry.in_off == g_entry.in.len)
        g_entry.in.len = g_entry.in_off = 0;
    entry_in_polling();
}

static void entry_in_read(void)
{
    if (g_entry.in_off) { /* the buffer never grows past ENTRY_IN_MAX (and the EOF byte) */
        memmove(g_entry.in.p, g_entry.in.p + g_entry.in_off, g_entry.in.len - g_entry.in_off);
        g_entry.in.len -= g_entry.in_off;
        g_entry.in_off = 0;
    }
    size_t room = ENTRY_IN_MAX - g_entry.in.len;
    if (room && !g_entry.in_eof) {
        buf_reserve(&g_entry.in, room);
        ssize_t n = read(0, g_entry.in.p + g_entry.in.len, room);
        if (n > 0) {
            g_entry.in.len += (size_t)n;
        } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            /* The host closed it (write_eof, or its server went away). A terminal has no
             * half-close: the EOF is the VEOF character, typed after what came before. */
            static const uint8_t eot = 4;
            buf_append(&g_entry.in, &eot, 1);
            g_entry.in_eof = true;
        }
    }
    entry_in_flush();
}

static void entry_event(struct ev *ev)
{
    if (ev == &g_entry.in_ev)
        entry_in_read();
    else if (ev == &g_entry.pty_ev)
        entry_in_flush();
    else
        entry_copy(ev->obj == &g_entry.fds[0] ? 0 : 1, false);
}

/* RESIZE_ENTRY {PTY_ROWS, PTY_COLS}: the entry-point's terminal (it gets SIGWINCH). */
static void h_resize_entry(struct conn *c, const struct msg *m)
{
    int64_t rows, cols;
    if (msg_int(m, SA_TAG_PTY_ROWS, &rows) != 1 || msg_int(m, SA_TAG_PTY_COLS, &cols) != 1 ||
        rows < 1 || rows > 65535 || cols < 1 || cols > 65535) {
        reply_err(c, m->id, EINVAL, "RESIZE_ENTRY needs PTY_ROWS and PTY_COLS, each 1..65535");
        return;
    }
    if (g_entry.pty_fd < 0) {
        reply_err(c, m->id, EINVAL, "the entry-point has no pty");
        return;
    }
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    if (ioctl(g_entry.pty_fd, TIOCSWINSZ, &ws) < 0) {
        reply_err(c, m->id, errno, "resize: %s", strerror(errno));
        return;
    }
    reply_ok(c, m->id);
}

/* A new terminal of the --pty size: the master (non-blocking) in *master, the slave returned. */
static int entry_open_pty(int *master)
{
    int mfd = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    char name[64];
    int sfd = -1;
    if (mfd < 0 || grantpt(mfd) < 0 || unlockpt(mfd) < 0 || ptsname_r(mfd, name, sizeof name) ||
        (sfd = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
        perror("shoal-agent: pty");
        exit(125);
    }
    struct winsize ws = {.ws_row = g_entry.pty_rows, .ws_col = g_entry.pty_cols};
    ioctl(mfd, TIOCSWINSZ, &ws);
    fcntl(mfd, F_SETFL, O_NONBLOCK);
    *master = mfd;
    return sfd;
}

static void start_entry(char **argv, long uid, long gid)
{
    int out[2], err[2], slave = -1, master = -1;
    if (g_entry.pty_rows) {
        slave = entry_open_pty(&master);
        /* Reading and writing the master are polled apart: a second descriptor to read it. */
        out[0] = fcntl(master, F_DUPFD_CLOEXEC, 3);
        out[1] = err[0] = err[1] = -1;
    } else if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        perror("shoal-agent: pipe");
        exit(125);
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("shoal-agent: fork");
        exit(125);
    }
    if (pid == 0) {
        child_reset_signals();
        setrlimit(RLIMIT_NOFILE, &g_child_nofile);
        if (slave >= 0) {
            /* A session of its own with the terminal as controlling tty, as a login shell has:
             * ^C typed on it signals the foreground group through the line discipline. */
            setsid();
            ioctl(slave, TIOCSCTTY, 0);
            dup2(slave, 0);
            dup2(slave, 1);
            dup2(slave, 2);
        } else {
            setpgid(0, 0);
            dup2(out[1], 1);
            dup2(err[1], 2);
        }
        if (setgroups(0, NULL) < 0 && errno != EPERM) /* EPERM: not root, nothing to drop */
            die_msg("shoal: cannot clear supplementary groups: ", strerror(errno), "", 126);
        if (gid >= 0 && setgid((gid_t)gid) < 0)
            die_msg("shoal: cannot set gid: ", strerror(errno), "", 126);
        if (uid >= 0 && setuid((uid_t)uid) < 0)
            die_msg("shoal: cannot set uid: ", strerror(errno), "", 126);
        execvp(argv[0], argv);
        int e = errno;
        if (e == ENOENT && !strchr(argv[0], '/'))
            die_msg(argv[0], ": command not found", "", 127);
        die_msg(argv[0], ": ", strerror(e), e == ENOENT ? 127 : 126);
    }
    g_entry.pid = pid;
    g_entry.fds[0] = out[0];
    g_entry.fds[1] = err[0];
    if (slave >= 0) {
        /* No setpgid here: it would make the child a group leader before its setsid, which then
         * fails. A signal forwarded before the setsid goes to the pid (on_signal). */
        close(slave); /* the master reads EIO once the program's side is closed */
        g_entry.pty_fd = master;
        g_entry.in_ev.kind = g_entry.pty_ev.kind = EV_ENTRY_OUT;
        fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
        entry_in_polling();
    } else {
        /* Also here, not only in the child: a signal forwarded to the group before the child
         * got to its own setpgid would find no group (ESRCH) and be lost. */
        setpgid(pid, pid);
        close(out[1]);
        close(err[1]);
    }
    for (int i = 0; i < 2; i++) {
        if (g_entry.fds[i] < 0)
            continue;
        fcntl(g_entry.fds[i], F_SETFL, O_NONBLOCK);
        g_entry.evs[i].kind = EV_ENTRY_OUT;
        g_entry.evs[i].obj = &g_entry.fds[i];
        ep_add(g_entry.fds[i], EPOLLIN, &g_entry.evs[i]);
    }
}

static int status_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 255;
}

/* ---------------------------------------------------------------- signals */

static void relisten(void);

static void on_signal(void)
{
    struct signalfd_siginfo si;
    while (read(g_sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
        int sig = (int)si.ssi_signo;
        if (sig == SIGCHLD)
            continue; /* reaped below, whatever the count of coalesced signals */
        if (sig == SA_SIGNAL_RELISTEN) {
            relisten(); /* the host's, after a checkpoint or a restore; never forwarded */
            continue;
        }
        if (g_entry.pid > 0) {
            if (kill(-g_entry.pid, sig) < 0 && errno == ESRCH)
                kill(g_entry.pid, sig); /* --pty: before the child's setsid made the group */
        } else if (sig == SIGTERM || sig == SIGINT) {
            /* No entry-point: "idles until killed"; a polite kill ends it too. */
            exit(128 + sig);
        }
    }
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            break;
        if (pid == g_entry.pid) {
            /* Hand on what is already in the pipes, then end the container with its code. */
            for (int i = 0; i < 2; i++)
                entry_copy(i, true);
            exit(status_code(status));
        }
        exec_on_child_exit(pid, status); /* orphans are just reaped */
    }
}

static void noop_handler(int sig)
{
    (void)sig;
}

static void setup_signals(void)
{
    signal(SIGPIPE, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    /* A handler (never run: the signals are blocked and read from the signalfd) keeps the
     * kernel from discarding these at PID 1, where default-action signals are dropped. */
    for (size_t i = 0; i < sizeof g_forward / sizeof g_forward[0]; i++) {
        signal(g_forward[i], noop_handler);
        sigaddset(&set, g_forward[i]);
    }
    signal(SA_SIGNAL_RELISTEN, noop_handler);
    sigaddset(&set, SA_SIGNAL_RELISTEN);
    sigprocmask(SIG_BLOCK, &set, NULL);
    g_sig_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (g_sig_fd < 0 || ep_add(g_sig_fd, EPOLLIN, &g_sig_ev) < 0) {
        perror("shoal-agent: signalfd");
        exit(125);
    }
}

/* ---------------------------------------------------------------- start-up */

/* Listens on `path`; false (with a message on stderr, the host's log) when it cannot. */
static bool listen_on(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
        fprintf(stderr, "shoal-agent: socket path too long: %s\n", path);
        return false;
    }
    strcpy(sa.sun_path, path);
    g_listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (g_listen_fd < 0) {
        perror("shoal-agent: socket");
        return false;
    }
    /* Whatever the sandbox left at the path (a file, a symlink, a stale socket) is replaced;
     * unlink never follows a symlink. */
    (void)unlink(path); /* on failure, bind reports the real problem */
    mode_t old = umask(0177); /* the socket is born 0600: no window with a wider mode */
    int rc = bind(g_listen_fd, (struct sockaddr *)&sa, sizeof sa);
    umask(old);
    if (rc < 0 || listen(g_listen_fd, 8) < 0) {
        fprintf(stderr, "shoal-agent: cannot listen on %s: %s\n", path, strerror(errno));
        close(g_listen_fd);
        g_listen_fd = -1;
        return false;
    }
    chmod(path, 0600);
    ep_add(g_listen_fd, EPOLLIN, &g_listen_ev);
    return true;
}

/* ---------------------------------------------------------------- checkpoints (QUIESCE) */

/* gVisor cannot checkpoint a sandbox that holds a Unix socket bound on (or connected to) the
 * host, which the listening socket and every host connection are. QUIESCE answers OK, and at
 * the next loop top closes every connection and the listener; exec sessions, their processes
 * and output stay. The host then checkpoints, and sends RELISTEN (to this sandbox and to one
 * restored from the checkpoint); TIMEOUT_MS later the agent listens again on its own. */
static void h_quiesce(struct conn *c, const struct msg *m)
{
    int64_t t = 30000;
    if (msg_int(m, SA_TAG_TIMEOUT_MS, &t) < 0 || t <= 0 || t > 3600000) {
        reply_err(c, m->id, EINVAL, "TIMEOUT_MS must be between 1 and 3600000");
        return;
    }
    reply_ok(c, m->id);
    g_quiesce_pending = true;
    g_quiesce_ms = (uint64_t)t;
}

static void quiesce_now(void)
{
    g_quiesce_pending = false;
    for (int i = 0; i < SA_LIMIT_MAX_CONNECTIONS; i++)
        if (g_conns[i])
            g_conns[i]->dead = true;
    conn_finish_dead(); /* the OK, if the socket takes it now */
    conns_reap_dead();
    if (g_listen_fd >= 0) {
        ep_del(g_listen_fd);
        close(g_listen_fd);
        g_listen_fd = -1;
        (void)unlink(g_sock_path);
    }
    g_relisten_at = now_ms() + g_quiesce_ms;
}

static void relisten(void)
{
    if (!g_relisten_at)
        return; /* not quiesced: nothing to do (anyone in the sandbox may send the signal) */
    g_relisten_at = 0;
    if (!listen_on(g_sock_path))
        g_relisten_at = now_ms() + 1000; /* the sandbox keeps running; try again */
}

static void usage(void)
{
    fputs("usage: shoal-agent --socket PATH [--uid N --gid N] [--log-limit BYTES] [--home DIR] [--compat]"
          " [--pty ROWS:COLS] -- [ENTRYPOINT ARGS...]\n",
          stderr);
    exit(2);
}

static long parse_num(const char *s)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < 0)
        usage();
    return (long)v;
}

/* --pty ROWS:COLS, each 1..65535. */
static void parse_size(const char *s)
{
    char *end;
    errno = 0;
    long rows = strtol(s, &end, 10);
    if (errno || *end != ':' || rows < 1 || rows > 65535)
        usage();
    long cols = strtol(end + 1, &end, 10);
    if (errno || *end || cols < 1 || cols > 65535)
        usage();
    g_entry.pty_rows = (unsigned short)rows;
    g_entry.pty_cols = (unsigned short)cols;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "--host-launch"))
        return host_launch(argc, argv); /* launch.c: the host's runc starter, not the agent */
    const char *sock = NULL;
    long uid = -1, gid = -1;
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) {
            i++;
            break;
        }
        if (!strcmp(a, "--compat")) {
            /* Use the code paths for kernels without openat2 and O_TMPFILE (gVisor): tests. */
            g_no_openat2 = g_no_tmpfile = true;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        if (!strcmp(a, "--socket"))
            sock = argv[++i];
        else if (!strcmp(a, "--uid"))
            uid = parse_num(argv[++i]);
        else if (!strcmp(a, "--gid"))
            gid = parse_num(argv[++i]);
        else if (!strcmp(a, "--log-limit"))
            g_entry.limit = (uint64_t)parse_num(argv[++i]);
        else if (!strcmp(a, "--pty"))
            parse_size(argv[++i]);
        else if (!strcmp(a, "--home"))
            ++i; /* accepted for the entry-point's HOME; the environment is the agent's own */
        else
            usage();
    }
    if (!sock)
        usage();

    prctl(PR_SET_DUMPABLE, 0);
    if (getpid() != 1)
        prctl(PR_SET_CHILD_SUBREAPER, 1); /* outside a container (tests): still reap orphans */

    /* Sessions, handles and watches need descriptors: take the hard limit for the agent;
     * children get the original limit back (exec.c). */
    getrlimit(RLIMIT_NOFILE, &g_child_nofile);
    struct rlimit nofile = g_child_nofile;
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
    g_reserve_fd = open("/", O_PATH | O_CLOEXEC);

    g_epfd = epoll_create1(EPOLL_CLOEXEC);
    if (g_epfd < 0) {
        perror("shoal-agent: epoll");
        return 125;
    }
    setup_signals();
    child_reset_list_init();
    exec_init();
    g_sock_path = sock;
    if (!listen_on(sock))
        return 125;
    if (i < argc)
        start_entry(argv + i, uid, gid);

    struct epoll_event evs[64];
    for (;;) {
        int timeout = -1;
        uint64_t now = now_ms();
        exec_check_timeouts(now, &timeout);
        for (int k = 0; k < SA_LIMIT_MAX_CONNECTIONS; k++)
            if (g_conns[k])
                probe_check_timeouts(g_conns[k], now, &timeout);
        conn_flush_all();
        conn_finish_dead();
        conns_reap_dead();
        if (g_quiesce_pending)
            quiesce_now();
        if (g_relisten_at) {
            if (now_ms() >= g_relisten_at) {
                relisten();
            } else {
                int left = (int)(g_relisten_at - now_ms());
                if (timeout < 0 || left < timeout)
                    timeout = left;
            }
        }

        int n = epoll_wait(g_epfd, evs, 64, timeout);
        if (n < 0 && errno != EINTR) {
            perror("shoal-agent: epoll_wait");
            return 125;
        }
        for (int k = 0; k < n; k++) {
            struct ev *ev = evs[k].data.ptr;
            uint32_t e = evs[k].events;
            switch (ev->kind) {
            case EV_LISTEN: on_accept(); break;
            case EV_SIGNAL: on_signal(); break;
            case EV_CONN: {
                struct conn *c = ev->obj;
                if (c->dead)
                    break;
                if (e & (EPOLLIN | EPOLLHUP | EPOLLERR))
                    on_conn_readable(c);
                if (e & EPOLLOUT)
                    conn_flush(c);
                break;
            }
            case EV_INOTIFY: watch_on_inotify(ev->obj); break;
            case EV_STREAM: exec_on_stream(ev, e); break;
            case EV_STDIN: exec_on_stdin(ev, e); break;
            case EV_ENTRY_OUT: entry_event(ev); break;
            case EV_PROBE: probe_on_event(ev); break;
            }
            /* Objects an event of this batch may still name are never freed inside the
             * batch: connections and forgotten sessions are freed at the loop top. */
        }
    }
}
