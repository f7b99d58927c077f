// Keeps the large blocks of XLA's step temporaries mapped between steps.
// Loaded into the process with LD_PRELOAD by vit_jax/host_memory.py.
//
// Why: XLA:CPU allocates each step's temporaries as one block
// (posix_memalign: 838 MB for the reference model at batch 64, 2.8 GB for
// ViT-Ti/16) and frees it when the step ends. glibc maps a block that large
// afresh and unmaps it on free, so every step the kernel faults the block in
// and zeroes it again, and on a VM with free page reporting it also hands
// the pages back to the host in between (docs/performance.md). Here a freed
// block of at least 64 MiB stays mapped, and the next request of the same
// size gets it back: no faults, no zeroing.
//
// Peak memory stays what it was. The next step often asks for its block a
// moment before the last step's block is freed; instead of mapping a second
// block then, a request waits up to 20 ms for a busy block of its size.
// A request that no free block fits (a new size: the process moved on, say
// from training to evaluation) unmaps every free block before it maps its
// own, as glibc would have unmapped them on free; otherwise the old work's
// block would stay resident beside the new one's. Freed blocks are also
// kept up to a quarter of the physical memory in all; past that the least
// recently used is unmapped.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum { kSlots = 32 };
static const size_t kMinBlock = (size_t)64 << 20;  // smaller ones: glibc
static const size_t kHugePage = (size_t)2 << 20;
static const long kWaitNs = 20 * 1000 * 1000;
static const long kPollNs = 100 * 1000;

struct Block {
  char* data;  // NULL: the slot is empty
  size_t size;
  int in_use;
  unsigned long last_used;
};

static struct Block blocks[kSlots];
static unsigned long use_clock;
static size_t free_limit;  // bytes of free blocks kept at most
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int (*next_posix_memalign)(void**, size_t, size_t);
static void (*next_free)(void*);
static void* (*next_realloc)(void*, size_t);
static size_t (*next_malloc_usable_size)(void*);

extern void __libc_free(void*);

// At load time; again on a call that comes first (another library's
// constructor may allocate before ours runs).
__attribute__((constructor)) static void resolve_next_allocator(void) {
  next_free = dlsym(RTLD_NEXT, "free");
  next_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
  next_realloc = dlsym(RTLD_NEXT, "realloc");
  next_malloc_usable_size = dlsym(RTLD_NEXT, "malloc_usable_size");
  free_limit = (size_t)sysconf(_SC_PHYS_PAGES) *
               (size_t)sysconf(_SC_PAGESIZE) / 4;
}

// A child forked while another thread holds the lock must not inherit it
// held (the lock is taken on frees of 2 MiB-aligned pointers).
static void lock_before_fork(void) { pthread_mutex_lock(&lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void register_fork_handlers(void) {
  pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
}

static size_t round_to_huge_pages(size_t size) {
  return (size + kHugePage - 1) & ~(kHugePage - 1);
}

// A fresh mapping of `size` bytes (a multiple of 2 MiB) that starts on a
// 2 MiB boundary, so the kernel can back it with transparent huge pages.
static char* map_block(size_t size) {
  char* raw = mmap(NULL, size + kHugePage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char* start = (char*)round_to_huge_pages((uintptr_t)raw);
  if (start > raw) munmap(raw, start - raw);
  char* end = raw + size + kHugePage;
  if (end > start + size) munmap(start + size, end - (start + size));
  madvise(start, size, MADV_HUGEPAGE);
  return start;
}

static void unmap_slot(struct Block* block) {
  munmap(block->data, block->size);
  block->data = NULL;
}

static struct Block* least_recently_used_free(void) {
  struct Block* oldest = NULL;
  for (int i = 0; i < kSlots; ++i) {
    struct Block* b = &blocks[i];
    if (b->data && !b->in_use &&
        (oldest == NULL || b->last_used < oldest->last_used))
      oldest = b;
  }
  return oldest;
}

static size_t free_bytes(void) {
  size_t total = 0;
  for (int i = 0; i < kSlots; ++i)
    if (blocks[i].data && !blocks[i].in_use) total += blocks[i].size;
  return total;
}

// Under the lock: a free block of exactly `size` bytes, now in use, or NULL;
// *busy tells whether a block of that size is in use.
static char* reuse_locked(size_t size, int* busy) {
  *busy = 0;
  for (int i = 0; i < kSlots; ++i) {
    struct Block* b = &blocks[i];
    if (!b->data || b->size != size) continue;
    if (b->in_use) {
      *busy = 1;
      continue;
    }
    b->in_use = 1;
    b->last_used = ++use_clock;
    return b->data;
  }
  return NULL;
}

// Under the lock: a newly mapped block in an empty slot, after every free
// block is unmapped; NULL when every slot is in use.
static char* map_into_slot_locked(size_t size) {
  for (int i = 0; i < kSlots; ++i)
    if (blocks[i].data && !blocks[i].in_use) unmap_slot(&blocks[i]);
  struct Block* slot = NULL;
  for (int i = 0; i < kSlots && slot == NULL; ++i)
    if (!blocks[i].data) slot = &blocks[i];
  if (slot == NULL) return NULL;
  char* data = map_block(size);
  if (data == NULL) return NULL;
  *slot = (struct Block){data, size, 1, ++use_clock};
  return data;
}

static long elapsed_ns(const struct timespec* since) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (now.tv_sec - since->tv_sec) * 1000000000L +
         (now.tv_nsec - since->tv_nsec);
}

static char* take_block(size_t size) {
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  const struct timespec poll = {0, kPollNs};
  for (;;) {
    int busy;
    const int stop_waiting = elapsed_ns(&start) >= kWaitNs;
    pthread_mutex_lock(&lock);
    char* data = reuse_locked(size, &busy);
    const int map_new = data == NULL && (!busy || stop_waiting);
    if (map_new) data = map_into_slot_locked(size);
    pthread_mutex_unlock(&lock);
    if (data != NULL || map_new) return data;  // NULL: glibc's block then
    nanosleep(&poll, NULL);
  }
}

// Under the lock: the slot of a block handed out here, or NULL.
static struct Block* slot_of_locked(const void* data) {
  for (int i = 0; i < kSlots; ++i)
    if (blocks[i].data == data && blocks[i].in_use) return &blocks[i];
  return NULL;
}

// Only blocks handed out here start on a 2 MiB boundary and need the lock.
static int may_be_ours(const void* data) {
  return data != NULL && ((uintptr_t)data & (kHugePage - 1)) == 0;
}

// Marks `data` free if it is one of ours (1), else leaves it alone (0).
static int give_back(void* data) {
  if (!may_be_ours(data)) return 0;
  pthread_mutex_lock(&lock);
  struct Block* block = slot_of_locked(data);
  if (block != NULL) {
    block->in_use = 0;
    while (free_bytes() > free_limit) unmap_slot(least_recently_used_free());
  }
  pthread_mutex_unlock(&lock);
  return block != NULL;
}

static size_t size_of_ours(const void* data) {
  if (!may_be_ours(data)) return 0;
  pthread_mutex_lock(&lock);
  struct Block* block = slot_of_locked(data);
  size_t size = block ? block->size : 0;
  pthread_mutex_unlock(&lock);
  return size;
}

int posix_memalign(void** out, size_t alignment, size_t size) {
  if (next_posix_memalign == NULL) resolve_next_allocator();
  int valid_alignment = alignment >= sizeof(void*) &&
                        (alignment & (alignment - 1)) == 0;
  if (size >= kMinBlock && valid_alignment && alignment <= kHugePage) {
    char* data = take_block(round_to_huge_pages(size));
    if (data != NULL) {
      *out = data;
      return 0;
    }
  }
  return next_posix_memalign(out, alignment, size);
}

void free(void* data) {
  if (give_back(data)) return;
  // Before the constructor has run (dlsym itself may free): glibc's.
  if (next_free == NULL) {
    __libc_free(data);
    return;
  }
  next_free(data);
}

void* realloc(void* data, size_t size) {
  if (next_realloc == NULL) resolve_next_allocator();
  size_t ours = size_of_ours(data);
  if (ours == 0) return next_realloc(data, size);
  if (size == 0) {
    give_back(data);
    return NULL;
  }
  void* moved = next_realloc(NULL, size);
  if (moved == NULL) return NULL;  // `data` stays valid, as realloc's would
  memcpy(moved, data, size < ours ? size : ours);
  give_back(data);
  return moved;
}

size_t malloc_usable_size(void* data) {
  if (next_malloc_usable_size == NULL) resolve_next_allocator();
  size_t ours = size_of_ours(data);
  return ours ? ours : next_malloc_usable_size(data);
}
