/* shoal-agent: shared declarations. See PROTOCOL.md for the wire contract. */
#ifndef SHOAL_AGENT_H
#define SHOAL_AGENT_H

#define _GNU_SOURCE
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#include "protocol.h"

#ifndef SOURCE_DIGEST
#define SOURCE_DIGEST "unknown"
#endif
/* The digest lets ensure_built() (and a host) tell which sources a binary came from. */
#define AGENT_VERSION_STRING "shoal-agent 1.0 src-sha256=" SOURCE_DIGEST
#define MAX_PATH_BYTES 4096
#define MAX_EXEC_ID 64
/* Replies queued for a connection beyond this stop us reading its requests (and its inotify
 * events) until the host drains them: the host's own back-pressure. */
#define OUT_HIGH_WATER (8u << 20)
#define MAX_PROBES_PER_CONN 64

/* ---- growable byte buffer ---- */
typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

void buf_reserve(buf_t *b, size_t extra);
void buf_append(buf_t *b, const void *p, size_t n);
void buf_free(buf_t *b);
void *xmalloc(size_t n);
char *xstrndup(const char *s, size_t n);

/* ---- epoll dispatch: every registered fd carries one of these ---- */
enum ev_kind { EV_LISTEN, EV_SIGNAL, EV_CONN, EV_INOTIFY, EV_STREAM, EV_STDIN, EV_ENTRY_OUT, EV_PROBE };
struct ev {
    enum ev_kind kind;
    void *obj;
};
extern int g_epfd;
int ep_add(int fd, uint32_t events, struct ev *ev);
int ep_mod(int fd, uint32_t events, struct ev *ev);
void ep_del(int fd);
uint64_t now_ms(void);

/* ---- a parsed request: fields point into the connection's input buffer ---- */
struct field {
    uint16_t tag;
    uint32_t len;
    const uint8_t *val;
};
struct msg {
    uint8_t type;
    uint32_t id;
    int nf;
    struct field *f;
};
const struct field *msg_get(const struct msg *m, uint16_t tag);
/* Integer field: 1 present & valid, 0 absent, -1 present with a wrong length. */
int msg_int(const struct msg *m, uint16_t tag, int64_t *out);
bool msg_flag(const struct msg *m, uint16_t tag);

struct handle;
struct wrec;
struct probe;

struct conn {
    int fd;
    struct ev ev;
    bool hello;
    bool dead;         /* closed at the next safe point of the loop */
    bool reading;      /* EPOLLIN wanted (false while the output is over the high water) */
    uint32_t ep_events;
    buf_t in;
    buf_t out;
    size_t out_off;    /* bytes of out already written */
    int npending;      /* READ/WAIT/STDIN/PROBE requests waiting for an event */
    size_t stdin_bytes; /* bytes held by this connection's waiting STDIN requests */
    struct handle *handles[SA_LIMIT_MAX_HANDLES];
    int64_t next_handle;
    /* watches */
    int ino_fd;
    struct ev ino_ev;
    bool ino_polling;
    struct wrec *wrecs;
    size_t nwrec, wcap;
    struct probe *probes;
    int nprobes;
};

/* ---- replies (appended to c->out; sent by the loop) ---- */
size_t fr_begin(struct conn *c, uint8_t type, uint32_t id);
void fr_int(struct conn *c, uint16_t tag, int64_t v);
void fr_bytes(struct conn *c, uint16_t tag, const void *p, size_t n);
void fr_str(struct conn *c, uint16_t tag, const char *s);
size_t fr_nest_begin(struct conn *c, uint16_t tag);
void fr_nest_end(struct conn *c, size_t pos);
void fr_end(struct conn *c, size_t start);
void reply_ok(struct conn *c, uint32_t id);
void reply_err(struct conn *c, uint32_t id, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void conn_out_changed(struct conn *c);

/* ---- exec (exec.c) ---- */
void exec_init(void);
void h_exec(struct conn *c, const struct msg *m);
void h_read(struct conn *c, const struct msg *m);
void h_wait(struct conn *c, const struct msg *m);
void h_stdin(struct conn *c, const struct msg *m);
void h_signal(struct conn *c, const struct msg *m);
void h_resize(struct conn *c, const struct msg *m);
void h_forget(struct conn *c, const struct msg *m);
void h_list_execs(struct conn *c, const struct msg *m);
void exec_on_stream(struct ev *ev, uint32_t events);
void exec_on_stdin(struct ev *ev, uint32_t events);
bool exec_on_child_exit(pid_t pid, int status); /* false when pid is no session's */
void exec_check_timeouts(uint64_t now, int *next_ms);
void exec_conn_closed(struct conn *c);

/* ---- files, handles, watches, probes (files.c) ---- */
void h_stat(struct conn *c, const struct msg *m);
void h_list(struct conn *c, const struct msg *m);
void h_read_file(struct conn *c, const struct msg *m);
void h_write_begin(struct conn *c, const struct msg *m);
void h_write_chunk(struct conn *c, const struct msg *m);
void h_write_commit(struct conn *c, const struct msg *m);
void h_write_abort(struct conn *c, const struct msg *m);
void h_mkdir(struct conn *c, const struct msg *m);
void h_remove(struct conn *c, const struct msg *m);
void h_rename(struct conn *c, const struct msg *m);
void h_hopen(struct conn *c, const struct msg *m);
void h_hread(struct conn *c, const struct msg *m);
void h_hwrite(struct conn *c, const struct msg *m);
void h_hseek(struct conn *c, const struct msg *m);
void h_hflush(struct conn *c, const struct msg *m);
void h_hclose(struct conn *c, const struct msg *m);
void h_watch(struct conn *c, const struct msg *m);
void h_unwatch(struct conn *c, const struct msg *m);
void h_probe_tcp(struct conn *c, const struct msg *m);
extern bool g_no_openat2, g_no_tmpfile;
extern struct rlimit g_child_nofile;
/* Signals whose disposition is not SIG_DFL in the agent (its handlers and ignores, and ignores
 * inherited from the runtime): the ones a child must reset before it unblocks signals. */
extern int g_child_reset[64];
extern int g_nchild_reset;
void child_reset_list_init(void);
void watch_on_inotify(struct conn *c);
void watch_update_polling(struct conn *c);
void probe_on_event(struct ev *ev);
void probe_check_timeouts(struct conn *c, uint64_t now, int *next_ms);
void files_conn_closed(struct conn *c);

/* launch.c: `--host-launch`, run on the host by the runc host to start runc (not in a sandbox). */
int host_launch(int argc, char **argv);

#endif
