/* Syscall timing loop for bench/hooks/run.py.
 *
 * Reads commands on stdin, one per line, answers one line each:
 *   connect PORT N   N x (socket, connect to 127.0.0.1:PORT, accept, close both)
 *   openat N         N x (openat("/dev/null"), close)
 *   getppid N        N x syscall(SYS_getppid)
 * Answer: nanoseconds per iteration (CLOCK_MONOTONIC), or "error <errno>".
 * The listener lives in this process, so a connect completes in the kernel
 * without a second process in the loop.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(void)
{
	int listener = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	int one = 1;
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) || listen(listener, 128)) {
		perror("listen");
		return 1;
	}
	socklen_t len = sizeof(addr);
	getsockname(listener, (struct sockaddr *)&addr, &len);
	printf("ready %d %d\n", getpid(), ntohs(addr.sin_port));
	fflush(stdout);
	char line[128], op[32];
	long n;
	while (fgets(line, sizeof(line), stdin)) {
		int port = 0;
		double start = now_ns();
		if (sscanf(line, "connect %d %ld", &port, &n) == 2) {
			struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port),
						  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
			for (long i = 0; i < n; i++) {
				int s = socket(AF_INET, SOCK_STREAM, 0);
				if (connect(s, (struct sockaddr *)&dst, sizeof(dst))) {
					printf("error %d\n", errno);
					fflush(stdout);
					close(s);
					goto next;
				}
				int c = accept(listener, NULL, NULL);
				close(c);
				close(s);
			}
		} else if (sscanf(line, "%31s %ld", op, &n) == 2 && !strcmp(op, "openat")) {
			for (long i = 0; i < n; i++)
				close(openat(AT_FDCWD, "/dev/null", O_RDONLY));
		} else if (!strcmp(op, "getppid")) {
			for (long i = 0; i < n; i++)
				syscall(SYS_getppid);
		} else {
			printf("error unknown\n");
			fflush(stdout);
			continue;
		}
		printf("%.1f\n", (now_ns() - start) / n);
		fflush(stdout);
next:		;
	}
	return 0;
}
