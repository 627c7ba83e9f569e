/* wanlink: a WAN between network namespaces, for bench/wan.py (this kernel may have no netem).

Theory of operation: the bench gives each peer's namespace one tun device, address 10.W.0.(i+1)/24;
this program holds the other end of every tun and is the network between them. An IPv4 packet read
from peer i's tun (its uplink) is dropped with probability `loss`, else queued on i's uplink: it
leaves when the uplink has sent what was queued before it at `rate` (drop-tail beyond `queue`
bytes of backlog), and is written to the destination peer's tun `delay` later. Per uplink, packets
leave in order and the delay is constant, so each uplink's queue is a FIFO. The same loss and delay
apply in both directions (data and acks), so RTT = 2 x delay. Packets are MTU-sized (tun without
GSO), so a loss is one TCP segment, as on a real path.

Usage: wanlink PREFIX N DELAY_US LOSS_PPM RATE_KBIT QUEUE_BYTES SEED
  creates tun devices PREFIX0..PREFIX{N-1} in the current namespace, prints "ready" and forwards
  until SIGTERM/SIGINT, then prints "forwarded F dropped_loss L dropped_queue Q" on stderr.
  The caller moves each tun into its namespace; the open descriptors keep working. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAXN 64
#define MTU 2048

typedef struct pkt { struct pkt *next; int64_t due_ns; int dst; int len; unsigned char data[]; } pkt;
typedef struct { pkt *head, *tail; int64_t busy_ns; } uplink;

static volatile sig_atomic_t stop = 0;
static void on_signal(int s) { (void)s; stop = 1; }
static int64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec; }
static uint64_t rng_state;
static uint32_t rnd(void) { rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17; return (uint32_t)(rng_state >> 11); }

int main(int argc, char **argv) {
    if (argc != 8) { fprintf(stderr, "usage: wanlink PREFIX N DELAY_US LOSS_PPM RATE_KBIT QUEUE_BYTES SEED\n"); return 2; }
    const char *prefix = argv[1];
    int n = atoi(argv[2]);
    int64_t delay_ns = atoll(argv[3]) * 1000LL;
    uint32_t loss_ppm = (uint32_t)atol(argv[4]);
    int64_t rate_kbit = atoll(argv[5]);            /* 0: unlimited */
    int64_t queue_bytes = atoll(argv[6]);
    rng_state = (uint64_t)atoll(argv[7]) * 2654435761ULL + 88172645463325252ULL;
    if (n < 2 || n > MAXN) { fprintf(stderr, "wanlink: N must be 2..%d\n", MAXN); return 2; }
    int fds[MAXN];
    uplink up[MAXN];
    memset(up, 0, sizeof up);
    for (int i = 0; i < n; i++) {
        struct ifreq ifr;
        fds[i] = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
        if (fds[i] < 0) { perror("wanlink: /dev/net/tun"); return 1; }
        memset(&ifr, 0, sizeof ifr);
        ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
        snprintf(ifr.ifr_name, IFNAMSIZ, "%s%d", prefix, i);
        if (ioctl(fds[i], TUNSETIFF, &ifr) < 0) { perror("wanlink: TUNSETIFF"); return 1; }
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("ready\n");
    fflush(stdout);
    long long forwarded = 0, lost = 0, queue_drops = 0;
    struct pollfd pfd[MAXN];
    unsigned char buf[MTU];
    while (!stop) {
        int64_t now = now_ns(), next = -1;
        for (int i = 0; i < n; i++) {             /* deliver what is due */
            while (up[i].head && up[i].head->due_ns <= now) {
                pkt *p = up[i].head;
                up[i].head = p->next;
                if (!up[i].head) up[i].tail = NULL;
                if (write(fds[p->dst], p->data, p->len) == p->len) forwarded++; else queue_drops++;
                free(p);
            }
            if (up[i].head && (next < 0 || up[i].head->due_ns < next)) next = up[i].head->due_ns;
        }
        int timeout_ms = next < 0 ? 100 : (int)((next - now + 999999) / 1000000);
        for (int i = 0; i < n; i++) { pfd[i].fd = fds[i]; pfd[i].events = POLLIN; pfd[i].revents = 0; }
        if (poll(pfd, n, timeout_ms) < 0) { if (errno == EINTR) continue; perror("wanlink: poll"); return 1; }
        for (int i = 0; i < n; i++) {
            if (!(pfd[i].revents & POLLIN)) continue;
            for (int burst = 0; burst < 64; burst++) {
                ssize_t len = read(fds[i], buf, sizeof buf);
                if (len <= 0) break;
                if (len < 20 || (buf[0] >> 4) != 4) continue;         /* IPv4 only */
                int dst = buf[19] - 1;                                 /* 10.W.0.(dst+1) */
                if (dst < 0 || dst >= n || dst == i) continue;
                if (loss_ppm && rnd() % 1000000u < loss_ppm) { lost++; continue; }
                int64_t t = now_ns();
                int64_t start = up[i].busy_ns > t ? up[i].busy_ns : t;
                if (rate_kbit > 0) {
                    if ((start - t) * rate_kbit / 8000000LL > queue_bytes) { queue_drops++; continue; }
                    up[i].busy_ns = start + (int64_t)len * 8000000LL / rate_kbit;
                } else {
                    up[i].busy_ns = start;
                }
                pkt *p = malloc(sizeof(pkt) + (size_t)len);
                if (!p) { queue_drops++; continue; }
                p->next = NULL; p->dst = dst; p->len = (int)len; p->due_ns = up[i].busy_ns + delay_ns;
                memcpy(p->data, buf, (size_t)len);
                if (up[i].tail) up[i].tail->next = p; else up[i].head = p;
                up[i].tail = p;
            }
        }
    }
    fprintf(stderr, "forwarded %lld dropped_loss %lld dropped_queue %lld\n", forwarded, lost, queue_drops);
    return 0;
}
