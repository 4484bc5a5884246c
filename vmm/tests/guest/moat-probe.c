/*
 * moat-probe: guest-side helper for moat-vmm's end-to-end tests (built static, put into a
 * test initramfs next to busybox).
 *
 *   moat-probe marker              write the boot marker (byte 123 to port 0x3f0)
 *   moat-probe echo PORT           accept one vsock connection on PORT, echo it back until EOF
 *   moat-probe send PORT TEXT      connect to the host (CID 2) on PORT, send TEXT, half-close,
 *                                  print everything the host answers
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int die(const char *what)
{
	fprintf(stderr, "moat-probe: %s: %s\n", what, strerror(errno));
	return 1;
}

static int copy(int from, int to)
{
	char buf[65536];
	for (;;) {
		ssize_t n = read(from, buf, sizeof(buf));
		if (n == 0)
			return 0;
		if (n < 0)
			return die("read");
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(to, buf + off, n - off);
			if (w < 0)
				return die("write");
			off += w;
		}
	}
}

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "marker")) {
		if (ioperm(0x3f0, 1, 1))
			return die("ioperm");
		outb(123, 0x3f0);
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "echo")) {
		struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
					 .svm_port = (unsigned)atoi(argv[2]) };
		int s = socket(AF_VSOCK, SOCK_STREAM, 0);
		if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 1))
			return die("listen");
		printf("MOAT-PROBE listening %s\n", argv[2]);
		fflush(stdout);
		int c = accept(s, NULL, NULL);
		if (c < 0)
			return die("accept");
		int rc = copy(c, c);
		close(c);
		return rc;
	}
	if (argc >= 4 && !strcmp(argv[1], "send")) {
		struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
					 .svm_port = (unsigned)atoi(argv[2]) };
		int s = socket(AF_VSOCK, SOCK_STREAM, 0);
		if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof(a)))
			return die("connect");
		size_t len = strlen(argv[3]);
		if (write(s, argv[3], len) != (ssize_t)len)
			return die("send");
		shutdown(s, SHUT_WR);
		return copy(s, 1);
	}
	fprintf(stderr, "usage: moat-probe marker | echo PORT | send PORT TEXT\n");
	return 2;
}
