/*
 * Times hot system calls under a seccomp filter.
 *
 *   seccomp_bench bare    ITERATIONS
 *   seccomp_bench onerule ITERATIONS          default allow, one rule: acct -> EPERM
 *   seccomp_bench file    ITERATIONS PROG.bpf  a struct sock_filter[] from the compiler
 *
 * Prints one line per measured call: "<name> <ns per call>". Each call is
 * timed over ITERATIONS back-to-back invocations with CLOCK_MONOTONIC.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void install(struct sock_filter *insns, size_t count)
{
	struct sock_fprog prog = { .len = (unsigned short)count, .filter = insns };

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		die("prctl(PR_SET_NO_NEW_PRIVS)");
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog))
		die("seccomp(SECCOMP_SET_MODE_FILTER)");
}

static void install_one_rule(void)
{
	struct sock_filter insns[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_acct, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	install(insns, sizeof(insns) / sizeof(insns[0]));
}

static void install_file(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	struct sock_filter *insns;

	if (fd < 0 || fstat(fd, &st))
		die(path);
	if (st.st_size <= 0 || st.st_size % sizeof(struct sock_filter)) {
		fprintf(stderr, "%s: not a sock_filter array\n", path);
		exit(2);
	}
	insns = malloc(st.st_size);
	if (!insns || read(fd, insns, st.st_size) != st.st_size)
		die("read");
	close(fd);
	install(insns, st.st_size / sizeof(struct sock_filter));
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long iterations, i;
	int devnull, avail;
	double start;

	if (argc < 3 || (strcmp(argv[1], "file") == 0 && argc < 4)) {
		fprintf(stderr, "usage: %s bare|onerule|file ITERATIONS [PROG.bpf]\n", argv[0]);
		return 2;
	}
	iterations = atol(argv[2]);
	devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (devnull < 0)
		die("/dev/null");

	if (strcmp(argv[1], "onerule") == 0)
		install_one_rule();
	else if (strcmp(argv[1], "file") == 0)
		install_file(argv[3]);
	else if (strcmp(argv[1], "bare") != 0)
		return 2;

	/* Sanity: the calls we time must be allowed, or we would time a denial. */
	if (syscall(SYS_getppid) < 0 || syscall(SYS_personality, 0xffffffffUL) < 0) {
		fprintf(stderr, "a timed call is denied by the filter\n");
		return 3;
	}
	if (syscall(SYS_ioctl, devnull, FIONREAD, &avail) < 0 && errno == EPERM) {
		fprintf(stderr, "ioctl is denied by the filter\n");
		return 3;
	}

	start = now_ns();
	for (i = 0; i < iterations; i++)
		syscall(SYS_getppid);
	printf("getppid %.2f\n", (now_ns() - start) / iterations);

	start = now_ns();
	for (i = 0; i < iterations; i++)
		syscall(SYS_ioctl, devnull, FIONREAD, &avail);
	printf("ioctl_fionread %.2f\n", (now_ns() - start) / iterations);

	start = now_ns();
	for (i = 0; i < iterations; i++)
		syscall(SYS_personality, 0xffffffffUL);
	printf("personality_query %.2f\n", (now_ns() - start) / iterations);
	return 0;
}
