/* The escape-matrix probe: run inside a privileged container of a moat pod (built static on the
 * host by tests/e2e/src/escape.rs, handed to the guest on a read-only volume). It makes the
 * system calls busybox has no applet for and prints one `ESC <row> ...` line per result.
 *
 *   probe handles PATH          (f) open_by_handle_at with the real and with forged handles
 *   probe flood DIR N M RELEASE (h) N files created and held open in DIR, M vsock connects to the
 *                               host, held until the file RELEASE exists (at most 600 s)
 *   probe vsock                 (i) connect to the agent's vsock ports (1024 ttrpc, 1025
 *                               port-forward) at the local, the guest's own and the host CID
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* What an fd opened from a forged handle shows: names of a directory, first bytes of a file. */
static void show(int fd, int i)
{
	struct stat st;
	if (fstat(fd, &st) != 0) {
		printf("ESC f-forged-open i=%d fstat-errno=%d\n", i, errno);
		return;
	}
	printf("ESC f-forged-open i=%d mode=%o ino=%llu", i, st.st_mode,
	       (unsigned long long)st.st_ino);
	if (S_ISDIR(st.st_mode)) {
		DIR *d = fdopendir(dup(fd));
		struct dirent *e;
		int n = 0;
		printf(" names=");
		while (d && (e = readdir(d)) && n < 40) {
			printf("%s,", e->d_name);
			n++;
		}
		if (d)
			closedir(d);
	} else if (S_ISREG(st.st_mode)) {
		char buf[48];
		ssize_t r = pread(fd, buf, sizeof buf - 1, 0);
		printf(" content=");
		for (ssize_t k = 0; k < r; k++)
			putchar(buf[k] >= 33 && buf[k] < 127 ? buf[k] : '.');
	}
	printf("\n");
}

static int handles(const char *path)
{
	struct file_handle *fh = malloc(sizeof *fh + MAX_HANDLE_SZ);
	struct file_handle *forged = malloc(sizeof *fh + MAX_HANDLE_SZ);
	int mount_id;
	fh->handle_bytes = MAX_HANDLE_SZ;
	if (name_to_handle_at(AT_FDCWD, path, fh, &mount_id, 0) != 0) {
		printf("ESC f-name-to-handle errno=%d (%s)\n", errno, strerror(errno));
		/* Forge one anyway, in FUSE's layout: type 0x81, nodeid (2 words) + generation. */
		fh->handle_type = 0x81;
		fh->handle_bytes = 12;
		memset(fh->f_handle, 0, 12);
	} else {
		printf("ESC f-name-to-handle ok type=0x%x bytes=%u\n", fh->handle_type,
		       fh->handle_bytes);
	}
	int dir = open(path, O_RDONLY | O_DIRECTORY);
	if (dir < 0)
		dir = open(".", O_RDONLY | O_DIRECTORY);
	int fd = open_by_handle_at(dir, fh, O_RDONLY);
	printf("ESC f-real %s errno=%d\n", fd >= 0 ? "opened" : "refused", fd >= 0 ? 0 : errno);
	if (fd >= 0)
		close(fd);

	/* Forged: every small nodeid (the server numbers its inodes from 1), large and random
	 * ones, each with generation 0 and with the real handle's generation; and handles of
	 * other types and lengths. */
	uint64_t ids[64];
	int nids = 0;
	for (uint64_t k = 1; k <= 48; k++)
		ids[nids++] = k;
	ids[nids++] = 1ULL << 32;
	ids[nids++] = 0xffffffffffffULL;
	ids[nids++] = 0xdeadbeefcafeULL;
	ids[nids++] = (uint64_t)-1;
	int tried = 0, opened = 0;
	char errs[512] = "";
	for (int i = 0; i < nids; i++) {
		for (int g = 0; g < 2; g++) {
			memcpy(forged, fh, sizeof *fh + fh->handle_bytes);
			if (forged->handle_bytes >= 8) {
				uint32_t hi = ids[i] >> 32, lo = (uint32_t)ids[i];
				memcpy(forged->f_handle, &hi, 4);
				memcpy(forged->f_handle + 4, &lo, 4);
			}
			if (g == 0 && forged->handle_bytes >= 12)
				memset(forged->f_handle + 8, 0, 4);
			tried++;
			int f = open_by_handle_at(dir, forged, O_RDONLY);
			if (f >= 0) {
				opened++;
				show(f, i * 2 + g);
				close(f);
			} else if (strlen(errs) < sizeof errs - 8) {
				char e[8];
				snprintf(e, sizeof e, "%d,", errno);
				if (!strstr(errs, e))
					strcat(errs, e);
			}
		}
	}
	/* Other handle types the guest kernel may pass to the file system as they are. */
	for (int t = 0; t < 256; t += 17) {
		memcpy(forged, fh, sizeof *fh + fh->handle_bytes);
		forged->handle_type = t;
		tried++;
		int f = open_by_handle_at(dir, forged, O_RDONLY);
		if (f >= 0) {
			opened++;
			show(f, 1000 + t);
			close(f);
		}
	}
	printf("ESC f-forged tried=%d opened=%d errnos=%s\n", tried, opened, errs);
	return 0;
}

static int flood(const char *dir, int nfiles, int nvsock, const char *release)
{
	struct rlimit rl = {1 << 16, 1 << 16};
	if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
		printf("ESC h-rlimit errno=%d\n", errno);
	int files = 0, file_err = 0, first_file_errno = 0;
	for (int i = 0; i < nfiles; i++) {
		char p[4096];
		snprintf(p, sizeof p, "%s/flood-%d", dir, i);
		if (open(p, O_CREAT | O_RDWR, 0644) >= 0) {
			files++;
		} else {
			if (!first_file_errno)
				first_file_errno = errno;
			file_err++;
		}
	}
	int socks = 0, sock_err = 0, first_sock_errno = 0;
	for (int i = 0; i < nvsock; i++) {
		int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (s < 0) {
			if (!first_sock_errno)
				first_sock_errno = errno;
			sock_err++;
			continue;
		}
		struct sockaddr_vm a = {.svm_family = AF_VSOCK,
					.svm_cid = VMADDR_CID_HOST,
					.svm_port = 1024 + (i % 4096)};
		if (connect(s, (struct sockaddr *)&a, sizeof a) == 0 || errno == EINPROGRESS) {
			socks++;
		} else {
			if (!first_sock_errno)
				first_sock_errno = errno;
			sock_err++;
			close(s);
		}
	}
	printf("ESC h-held files=%d file_errors=%d first_file_errno=%d vsock=%d vsock_errors=%d "
	       "first_vsock_errno=%d\n",
	       files, file_err, first_file_errno, socks, sock_err, first_sock_errno);
	fflush(stdout);
	for (int i = 0; i < 6000 && access(release, F_OK) != 0; i++)
		poll(NULL, 0, 100);
	printf("ESC h-released\n");
	return 0;
}

/* One connect to cid:port with a bounded wait; prints its errno (0: connected, a breach). */
static void try_vsock(unsigned cid, unsigned port)
{
	int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		printf("ESC i-connect cid=%u port=%u rc=%d socket\n", cid, port, errno);
		return;
	}
	struct timeval tv = {3, 0};
	setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	int rc = connect(s, (struct sockaddr *)&a, sizeof a) == 0 ? 0 : errno;
	printf("ESC i-connect cid=%u port=%u rc=%d\n", cid, port, rc);
	close(s);
}

static int vsock(void)
{
	unsigned own = 3;
	int dev = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (dev >= 0) {
		ioctl(dev, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &own);
		close(dev);
	}
	printf("ESC i-own-cid %u\n", own);
	unsigned cids[] = {VMADDR_CID_LOCAL, own, VMADDR_CID_HOST};
	for (unsigned c = 0; c < sizeof cids / sizeof cids[0]; c++)
		for (unsigned port = 1024; port <= 1025; port++)
			try_vsock(cids[c], port);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 3 && strcmp(argv[1], "handles") == 0)
		return handles(argv[2]);
	if (argc == 6 && strcmp(argv[1], "flood") == 0)
		return flood(argv[2], atoi(argv[3]), atoi(argv[4]), argv[5]);
	if (argc == 2 && strcmp(argv[1], "vsock") == 0)
		return vsock();
	fprintf(stderr, "usage: probe handles PATH | probe flood DIR N M RELEASE | probe vsock\n");
	return 2;
}
