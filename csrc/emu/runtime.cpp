// The emulator's runtime: fibers and their scheduler, barriers and warp collectives, launch-limit checks,
// shared-memory race / never-written checks, global bounds checks and the tracking allocator. Compiled like
// the kernels; what kernel code calls is unchecked and pauses the checks (Pause), so it never re-enters them.
#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include "emu/cuda_emu.h"
#include "emu/op_scope.h"
#include "emu/runtime.h"
#include "emu/tile_emu.h"

// ---- fibers: a minimal x86-64 context switch (callee-saved registers, MXCSR, x87 control word) ----------
// swapcontext would do, but it makes a signal-mask syscall per switch and blocks switch thousands of times.
extern "C" void kdk_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl kdk_emu_switch
.type kdk_emu_switch,@function
kdk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size kdk_emu_switch,.-kdk_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

namespace kdk_emu {

Device& device() {
  static Device d;
  return d;
}

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kStaticSmemMax = 48 * 1024;   // static __shared__ per block, every architecture
constexpr size_t kDefaultDynSmem = 48 * 1024;  // dynamic shared memory without the opt-in attribute
constexpr int kMaxThreads = 1024;

enum class State { kRun, kBarrier, kWarp, kDone };
enum class WarpOp { kNone, kSync, kShfl, kBallot, kGather };

const char* op_name(WarpOp op, Shfl k) {
  if (op == WarpOp::kSync) return "__syncwarp";
  if (op == WarpOp::kBallot) return "a vote (__ballot_sync / __any_sync / __all_sync)";
  if (op == WarpOp::kGather) return "a warp-wide tile primitive (mma.sync / ldmatrix)";
  switch (k) {
    case Shfl::kIdx: return "__shfl_sync";
    case Shfl::kXor: return "__shfl_xor_sync";
    case Shfl::kUp: return "__shfl_up_sync";
    default: return "__shfl_down_sync";
  }
}

struct Thread {
  void* sp = nullptr;
  unsigned char* lo = nullptr;  // stack
  unsigned char* hi = nullptr;
  dim3 idx;
  int id = 0, lane = 0, warp = 0;
  State state = State::kRun;
  WarpOp op = WarpOp::kNone;
  Shfl kind = Shfl::kIdx;
  unsigned mask = 0;
  uint64_t in = 0, out = 0;
  int arg = 0, width = 32;
  bool pred = false;
  uint32_t clock = 0;                 // warp-sync generations this thread took part in
  std::array<uint32_t, 32> vc{};      // the latest clock of each lane of its warp this thread knows of
  const void* gin = nullptr;          // a warp gather's contribution, destination and size
  void* gout = nullptr;
  size_t gbytes = 0;
  struct Copy { void* dst; const void* src; int bytes, src_bytes, group; };
  std::vector<Copy> async;            // queued cp.async copies (group -1: not committed yet)
  int groups = 0;                     // cp.async groups committed
};

// What a shared byte last saw: its last writer, and the reads since then (for write-after-read races).
struct Shadow {
  int16_t writer;   // thread id, -1: never written in this block
  int16_t reader;   // thread id, -1: none, -2: several in warp rwarp (lanes r_lanes), -3: several warps
  int16_t rwarp;
  int16_t atomic;   // the last write was an atomic: 1 of one thread, 2 of several since the last barrier
  int16_t inflight; // a cp.async copy into this byte was issued and not yet retired by a wait
  uint32_t w_epoch, w_clock, r_epoch, r_clock, r_lanes;
};

constexpr Shadow kNeverWritten{-1, -1, -1, 0, 0, 0, 0, 0, 0, 0};

struct Launch {
  std::string name;
  dim3 grid, block, bidx;
  size_t dyn = 0;
  Body body = nullptr;
  const void* closure = nullptr;
  int nthreads = 0;
  std::vector<Thread> threads;
  Thread* cur = nullptr;
  void* sched_sp = nullptr;
  // shared memory: [dynamic | static area]; the buffers outlive the launch (one launch at a time), so
  // launches do not pay for fresh pages
  std::vector<unsigned char>& smem;
  std::vector<Shadow>& shadow;
  unsigned char* base = nullptr;  // 256-byte aligned start of shared memory (dynamic first)
  size_t span = 0;                 // bytes from base the shadow covers
  size_t static0 = 0;              // offset of the static area: after the dynamic part and a 256-byte gap
  size_t opt_in = 0;               // the most dynamic + static shared memory this launch may use
  size_t static_used = 0;
  std::unordered_map<const void*, size_t> static_off;
  uint32_t epoch = 1;
  std::string error;
};

Launch* g_launch = nullptr;       // the launch being emulated (one at a time, under g_run_mutex)
bool g_active = false;            // a fiber runs kernel code: check its memory accesses
pthread_t g_owner;                // the thread that runs the launch
uintptr_t g_stack_lo = 0, g_stack_hi = 0;  // the running fiber's stack: accesses there need no check

// The runtime's own code runs unchecked: every entry point kernel code calls pauses the checks (the
// runtime may call instrumented copies of inline library functions, which must not re-enter the hook).
#define KDK_EMU_INLINE_NO_CHECK __attribute__((no_sanitize_address, always_inline)) inline
struct Pause {
  bool was;
  KDK_EMU_INLINE_NO_CHECK Pause() : was(g_active) { g_active = false; }
  KDK_EMU_INLINE_NO_CHECK ~Pause() { g_active = was; }
};
std::mutex g_run_mutex;

unsigned char* g_stacks = nullptr;  // kMaxThreads stacks, each with a guard page at its bottom

unsigned char* stacks() {
  if (!g_stacks) {
    const size_t bytes = kStackBytes * kMaxThreads;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "kdkernels emulator: cannot map fiber stacks");
    g_stacks = static_cast<unsigned char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(g_stacks + i * kStackBytes, 4096, PROT_NONE);
  }
  return g_stacks;
}

std::string dim_str(dim3 d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}

std::string demangle(const char* n) {
  int status = 0;
  char* d = abi::__cxa_demangle(n, nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : n;
  free(d);
  return out;
}

std::string kernel_name(const void* k) {
  Dl_info info;
  if (dladdr(k, &info) && info.dli_sname) return demangle(info.dli_sname);
  std::ostringstream s;
  s << "kernel@" << k;
  return s.str();
}

// The kernel's __launch_bounds__: the NOP bytes cuda_emu.h put at its entry (after an endbr64), 0 = none.
int launch_bounds(const void* k) {
  const auto* b = static_cast<const unsigned char*>(k);
  if (b[0] == 0xf3 && b[1] == 0x0f && b[2] == 0x1e && b[3] == 0xfa) b += 4;
  int n = 0;
  while (n <= kMaxThreads && b[n] == 0x90) ++n;
  return n;
}

std::string where(const Launch& L, const Thread* t) {
  std::ostringstream s;
  s << "in kernel " << L.name << ", block " << dim_str(L.bidx);
  if (t) s << ", thread " << dim_str(t->idx);
  return s.str();
}

[[noreturn]] void fiber_exit();

// Records the first error of the launch and leaves the fiber for good (the scheduler then stops).
void fail(const std::string& what) {
  Launch& L = *g_launch;
  if (L.error.empty()) L.error = "kdkernels emulator: " + what + " (" + where(L, L.cur) + ")";
  fiber_exit();
}

// ---- the scheduler ---------------------------------------------------------------------------------
// Called with the checks paused (every caller holds a Pause, whose end resumes them).
void yield() {
  Launch& L = *g_launch;
  kdk_emu_switch(&L.cur->sp, L.sched_sp);
}

[[noreturn]] KDK_EMU_NO_CHECK void fiber_exit() {
  g_active = false;
  Launch& L = *g_launch;
  L.cur->state = State::kDone;
  kdk_emu_switch(&L.cur->sp, L.sched_sp);
  std::abort();  // a finished fiber is never resumed
}

KDK_EMU_NO_CHECK void fiber_entry() {
  Launch& L = *g_launch;
  const Body body = L.body;
  const void* closure = L.closure;
  g_active = true;
  body(closure);
  fiber_exit();
}

void* fiber_init(unsigned char* hi) {
  // The stack fiber_init leaves is what kdk_emu_switch pops: MXCSR/x87 word, six registers, a return
  // address into fiber_entry, and a zero slot so fiber_entry starts with the ABI's alignment.
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(hi) & ~uintptr_t(15));
  *--top = 0;
  *--top = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--top = 0;
  *--top = 0x037F00001F80ull;  // MXCSR 0x1F80 (low 4 bytes), x87 control word 0x037F
  return top;
}

bool lane_in(unsigned mask, int lane) { return (mask >> lane) & 1u; }

std::string state_str(const Thread& t) {
  std::ostringstream s;
  switch (t.state) {
    case State::kDone: return "has exited";
    case State::kBarrier: return "waits at __syncthreads";
    case State::kRun: return "is running";
    default: s << "calls " << op_name(t.op, t.kind) << " with mask 0x" << std::hex << t.mask; return s.str();
  }
}

// The source lane of a shuffle, as PTX shfl.sync computes it (the lane/offset operand's low 5 bits; a source
// outside the allowed range returns the caller's own value).
int shfl_src(const Thread& t) {
  const int w = t.width, base = t.lane & ~(w - 1), rel = t.lane - base, arg = t.arg & 31;
  switch (t.kind) {
    case Shfl::kIdx: return base + (arg & (w - 1));
    case Shfl::kXor: { const int s = t.lane ^ arg; return s <= base + w - 1 ? s : t.lane; }
    case Shfl::kUp: return rel - arg >= 0 ? t.lane - arg : t.lane;
    default: return rel + arg < w ? t.lane + arg : t.lane;
  }
}

// Why t's collective cannot complete now ("" if every lane of its mask has arrived at the same one).
std::string pending_reason(const Launch& L, const Thread& t) {
  const int base = t.warp * 32;
  std::ostringstream err;
  if (!lane_in(t.mask, t.lane)) {
    err << "lane " << t.lane << " calls " << op_name(t.op, t.kind) << " with mask 0x" << std::hex << t.mask
        << " that does not include itself";
    return err.str();
  }
  for (int j = 0; j < 32; ++j) {
    if (!lane_in(t.mask, j)) continue;
    if (base + j >= L.nthreads) {
      err << op_name(t.op, t.kind) << " mask 0x" << std::hex << t.mask << " names lane " << std::dec << j
          << ", which does not exist in a block of " << L.nthreads << " threads";
      return err.str();
    }
    const Thread& u = L.threads[base + j];
    if (u.state != State::kWarp || u.op != t.op || u.kind != t.kind || u.mask != t.mask || u.gbytes != t.gbytes) {
      err << "lane " << t.lane << " calls " << op_name(t.op, t.kind) << " with mask 0x" << std::hex << t.mask
          << " but lane " << std::dec << j << " " << state_str(u);
      return err.str();
    }
  }
  return "";
}

// Completes t's collective (every lane of its mask has arrived); false with L.error set on a bad shuffle.
bool complete(Launch& L, const Thread& t) {
  const int base = t.warp * 32;
  const unsigned mask = t.mask;
  const WarpOp op = t.op;
  uint64_t ballot = 0;
  std::array<uint32_t, 32> merged{};
  for (int j = 0; j < 32; ++j) {
    if (!lane_in(mask, j)) continue;
    Thread& u = L.threads[base + j];
    ballot |= uint64_t(u.pred) << j;
    if (op == WarpOp::kSync) {
      u.vc[j] = ++u.clock;
      for (int i = 0; i < 32; ++i) merged[i] = std::max(merged[i], u.vc[i]);
    }
  }
  for (int j = 0; j < 32; ++j) {
    if (!lane_in(mask, j)) continue;
    Thread& u = L.threads[base + j];
    if (op == WarpOp::kShfl) {
      const int src = shfl_src(u);
      if (!lane_in(mask, src)) {
        L.cur = &u;
        std::ostringstream e;
        e << "kdkernels emulator: lane " << j << " reads lane " << src << " in " << op_name(op, u.kind)
          << ", which is not in the mask 0x" << std::hex << mask << " (" << where(L, &u) << ")";
        L.error = e.str();
        return false;
      }
      u.out = L.threads[base + src].in;
    } else if (op == WarpOp::kBallot) {
      u.out = ballot;
    } else if (op == WarpOp::kGather) {
      for (int i = 0; i < 32; ++i)
        if (lane_in(mask, i))
          std::memcpy(static_cast<unsigned char*>(u.gout) + i * u.gbytes, L.threads[base + i].gin, u.gbytes);
    } else {
      u.vc = merged;
    }
  }
  for (int j = 0; j < 32; ++j)
    if (lane_in(mask, j)) {
      L.threads[base + j].state = State::kRun;
      L.threads[base + j].op = WarpOp::kNone;
    }
  return true;
}

// Completes every warp collective whose lanes have all arrived (a warp may have several pending, e.g.
// __syncwarp(mask) in both branches of a divergent if); true if any did. When none can, a pending one is a
// mask mismatch: some lane of its mask has exited, waits at a barrier or in another collective.
bool resolve_warps(Launch& L) {
  bool any = false;
  for (Thread& t : L.threads)
    if (t.state == State::kWarp && pending_reason(L, t).empty()) {
      if (!complete(L, t)) return false;
      any = true;
    }
  if (any) return true;
  for (Thread& t : L.threads)
    if (t.state == State::kWarp) {
      L.cur = &t;
      L.error = "kdkernels emulator: warp collective mask mismatch: " + pending_reason(L, t) + " (" + where(L, &t) + ")";
      return false;
    }
  return false;
}

void run_block(Launch& L) {
  const dim3 b = L.block;
  unsigned char* st = stacks();
  for (int i = 0; i < L.nthreads; ++i) {
    Thread& t = L.threads[i];
    t = Thread{};
    t.idx = dim3(i % b.x, (i / b.x) % b.y, i / (b.x * b.y));
    t.id = i; t.lane = i % 32; t.warp = i / 32;
    t.lo = st + i * kStackBytes + 4096;
    t.hi = st + (i + 1) * kStackBytes;
    t.sp = fiber_init(t.hi);
  }
  // Back to never-written (and NaN bytes: a stray read is loud even unchecked) where earlier blocks of
  // this launch could have touched; the rest is still as the launch set it up.
  const size_t used = L.static0 + L.static_used;
  std::fill(L.base, L.base + used, 0xFF);
  std::fill(L.shadow.begin(), L.shadow.begin() + used, kNeverWritten);
  L.epoch = 1;
  for (;;) {
    bool ran = false;
    for (Thread& t : L.threads) {
      if (t.state != State::kRun) continue;
      L.cur = &t;
      g_stack_lo = reinterpret_cast<uintptr_t>(t.lo);
      g_stack_hi = reinterpret_cast<uintptr_t>(t.hi);
      kdk_emu_switch(&L.sched_sp, t.sp);
      ran = true;
      if (!L.error.empty()) return;
    }
    if (ran) continue;
    if (resolve_warps(L)) continue;
    if (!L.error.empty()) return;
    bool waiting = false, all_at_barrier = true;
    for (const Thread& t : L.threads) {
      if (t.state == State::kBarrier) waiting = true;
      else if (t.state != State::kDone) all_at_barrier = false;
    }
    if (!waiting) return;  // every thread has exited
    if (!all_at_barrier) {
      L.error = "kdkernels emulator: deadlock: threads wait at __syncthreads while others wait elsewhere (" +
                where(L, nullptr) + ")";
      return;
    }
    ++L.epoch;
    for (Thread& t : L.threads)
      if (t.state == State::kBarrier) t.state = State::kRun;
  }
}

// ---- global memory: the ranges a kernel may touch -----------------------------------------------------
struct Range {
  uintptr_t end;
  int count;
};
std::mutex g_mem_mutex;
std::map<uintptr_t, Range> g_ranges;
uintptr_t g_hit_lo = 0, g_hit_hi = 0;  // the last range a check found (reset at every launch)

void add_range(uintptr_t lo, uintptr_t hi) {
  std::lock_guard<std::mutex> g(g_mem_mutex);
  auto [it, fresh] = g_ranges.try_emplace(lo, Range{hi, 0});
  it->second.end = std::max(it->second.end, hi);
  ++it->second.count;
}

void remove_range(uintptr_t lo) {
  std::lock_guard<std::mutex> g(g_mem_mutex);
  auto it = g_ranges.find(lo);
  if (it != g_ranges.end() && --it->second.count == 0) g_ranges.erase(it);
  g_hit_lo = g_hit_hi = 0;
}

bool global_ok(uintptr_t a, size_t n) {
  if (a >= g_hit_lo && a + n <= g_hit_hi) return true;
  std::lock_guard<std::mutex> g(g_mem_mutex);
  // The nearest lower start first, then further back: storages may nest (views of one numpy buffer).
  auto it = g_ranges.upper_bound(a);
  for (int steps = 0; it != g_ranges.begin() && steps < 64; ++steps) {
    --it;
    if (a + n <= it->second.end) {
      g_hit_lo = it->first;
      g_hit_hi = it->second.end;
      return true;
    }
  }
  return false;
}

// Tensors allocated while an emulated op runs: 256-byte red zones on both sides, tracked until freed.
constexpr size_t kRedZone = 256;
void tracked_free(void* base) {
  remove_range(reinterpret_cast<uintptr_t>(base) + kRedZone);
  c10::free_cpu(base);
}
// Installed once as the CPU allocator; it tracks only while an emulated op runs on the thread that runs
// it, and hands every other allocation to the allocator it replaced.
std::atomic<int> g_scope_depth{0};
pthread_t g_scope_owner;
c10::Allocator* g_next_alloc = nullptr;

struct TrackingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (g_scope_depth.load() == 0 || !pthread_equal(pthread_self(), g_scope_owner)) return g_next_alloc->allocate(n);
    auto* base = static_cast<unsigned char*>(c10::alloc_cpu(n + 2 * kRedZone));
    unsigned char* p = base + kRedZone;
    add_range(reinterpret_cast<uintptr_t>(p), reinterpret_cast<uintptr_t>(p + n));
    return {p, base, &tracked_free, c10::Device(c10::DeviceType::CPU)};
  }
  // Raw users (oneDNN's scratch buffers) free with this; their allocations are never tracked ones.
  c10::DeleterFnPtr raw_deleter() const override { return g_next_alloc->raw_deleter(); }
  void copy_data(void* dst, const void* src, size_t n) const override { default_copy_data(dst, src, n); }
};
TrackingAllocator g_tracking;

// ---- shared memory checks ----------------------------------------------------------------------------
bool ordered_after_write(const Launch& L, const Shadow& s, const Thread& t) {
  if (s.writer == t.id || s.w_epoch < L.epoch) return true;
  const Thread& w = L.threads[s.writer];
  return w.warp == t.warp && t.vc[w.lane] > s.w_clock;
}

bool ordered_after_reads(const Launch& L, const Shadow& s, const Thread& t) {
  if (s.r_epoch < L.epoch || s.reader == -1 || s.reader == t.id) return true;
  if (s.reader == -3) return false;
  if (s.rwarp != t.warp) return false;
  for (int l = 0; l < 32; ++l)
    if (lane_in(s.r_lanes, l) && l != t.lane && t.vc[l] <= s.r_clock) return false;
  return true;
}

// The offset of an access inside the block's dynamic or static shared memory; out of both, an error.
size_t shared_offset(Launch& L, uintptr_t a, size_t n, bool write) {
  const size_t off = a - reinterpret_cast<uintptr_t>(L.base);
  const bool in_dyn = off + n <= L.dyn;
  const bool in_static = off >= L.static0 && off + n <= L.static0 + L.static_used;
  if (!in_dyn && !in_static) {
    std::ostringstream e;
    e << "shared-memory out-of-bounds " << (write ? "write" : "read") << " of " << n << " bytes at offset " << off
      << " (0x" << std::hex << a << std::dec << "); the block has " << L.dyn << " bytes of dynamic and "
      << L.static_used << " of static shared memory";
    fail(e.str());
  }
  return off;
}

void shared_access(Launch& L, uintptr_t a, size_t n, bool write) {
  Thread& t = *L.cur;
  const size_t off = shared_offset(L, a, n, write);
  const Shadow first = L.shadow[off];
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = L.shadow[off + i];
    // The bytes of one access almost always share their history: check the first, copy its outcome.
    if (i > 0 && std::memcmp(&s, &first, sizeof(Shadow)) == 0) {
      s = L.shadow[off];
      continue;
    }
    const char* kind = nullptr;
    int other = -1;
    if (s.inflight) kind = "shared memory accessed while a cp.async copy into it is in flight (no cp.async.wait_group "
                           "retired it)";
    else if (!write && s.writer == -1) kind = "read of shared memory never written in this block";
    else if (s.writer >= 0 && (!ordered_after_write(L, s, t) || (s.atomic == 2 && s.w_epoch == L.epoch))) {
      kind = write ? "shared-memory race (write after write)" : "shared-memory race (read after write)";
      other = s.writer;
    } else if (write && !ordered_after_reads(L, s, t)) {
      kind = "shared-memory race (write after read)";
      other = s.reader >= 0 ? s.reader : -1;
    }
    if (kind) {
      std::ostringstream e;
      e << kind << ": " << n << " bytes at shared offset " << off << " (0x" << std::hex << a << std::dec << ")";
      if (other >= 0) e << ", last touched by thread " << dim_str(L.threads[other].idx) << " with no barrier both passed";
      else if (s.reader < -1) e << ", read by other threads with no barrier both passed";
      fail(e.str());
    }
    if (write) {
      s.writer = static_cast<int16_t>(t.id);
      s.w_epoch = L.epoch;
      s.w_clock = t.clock;
      s.r_epoch = 0;
      s.reader = -1;
      s.atomic = 0;
    } else if (s.r_epoch < L.epoch || s.reader == -1) {
      s.reader = static_cast<int16_t>(t.id); s.rwarp = static_cast<int16_t>(t.warp);
      s.r_epoch = L.epoch; s.r_clock = t.clock; s.r_lanes = 1u << t.lane;
    } else if (s.reader == t.id) {
      s.r_clock = t.clock;  // its latest read is the one a later writer must be ordered after
    } else {
      if (s.reader != -3 && s.rwarp == t.warp) {
        s.reader = -2; s.r_lanes |= 1u << t.lane; s.r_clock = std::max(s.r_clock, t.clock);
      } else {
        s.reader = -3;
      }
    }
  }
}

// An atomic read-modify-write of shared memory: ordered with other atomics on the same bytes, but a race
// with plain writes and reads of other threads since the last barrier both passed.
void atomic_shared(Launch& L, uintptr_t a, size_t n) {
  Thread& t = *L.cur;
  const size_t off = shared_offset(L, a, n, true);
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = L.shadow[off + i];
    if (s.writer == -1) fail("read of shared memory never written in this block: an atomic on " + std::to_string(n) +
                             " bytes at shared offset " + std::to_string(off));
    const bool after_atomic = s.atomic && s.w_epoch == L.epoch;
    if ((!after_atomic && !ordered_after_write(L, s, t)) || !ordered_after_reads(L, s, t))
      fail("shared-memory race (atomic with a plain access): " + std::to_string(n) + " bytes at shared offset " +
           std::to_string(off) + ", touched by another thread with no barrier both passed");
    const int16_t several = after_atomic && (s.writer != t.id || s.atomic == 2) ? 2 : 1;
    s.writer = static_cast<int16_t>(t.id); s.w_epoch = L.epoch; s.w_clock = t.clock;
    s.r_epoch = 0; s.reader = -1; s.atomic = several;
  }
}

}  // namespace

// ---- the memory-access hook every instrumented load and store calls -----------------------------------
namespace {
void check_impl(uintptr_t a, size_t n, bool write) {
  Launch& L = *g_launch;
  const Thread& t = *L.cur;
  if (a >= reinterpret_cast<uintptr_t>(t.lo) && a + n <= reinterpret_cast<uintptr_t>(t.hi)) return;
  const uintptr_t s0 = reinterpret_cast<uintptr_t>(L.base);
  if (a + n > s0 && a < s0 + L.span) return shared_access(L, a, n, write);
  if (global_ok(a, n)) return;
  std::ostringstream e;
  e << "global-memory out-of-bounds " << (write ? "write" : "read") << " of " << n << " bytes at 0x" << std::hex << a
    << ", outside every tensor the op was given or allocated";
  fail(e.str());
}
}  // namespace

KDK_EMU_NO_CHECK void check_access(uintptr_t a, size_t n, bool write) {
  if (!g_active || !pthread_equal(pthread_self(), g_owner)) return;
  Pause p;
  check_impl(a, n, write);
}

// The hooks' fast path: nothing to check outside kernel code or on the fiber's own stack.
KDK_EMU_INLINE_NO_CHECK void hook(uintptr_t a, size_t n, bool write) {
  if (!g_active || (a >= g_stack_lo && a + n <= g_stack_hi)) return;
  check_access(a, n, write);
}

// ---- the built-ins -------------------------------------------------------------------------------------
KDK_EMU_NO_CHECK dim3 thread_idx() { return g_launch->cur->idx; }
KDK_EMU_NO_CHECK dim3 block_idx() { return g_launch->bidx; }
KDK_EMU_NO_CHECK dim3 block_dim() { return g_launch->block; }
KDK_EMU_NO_CHECK dim3 grid_dim() { return g_launch->grid; }
KDK_EMU_NO_CHECK unsigned char* dynamic_smem() {
  Pause p;
  return g_launch->base;
}

KDK_EMU_NO_CHECK unsigned char* static_smem(const void* key, size_t bytes, size_t align) {
  Pause p;
  Launch& L = *g_launch;
  auto it = L.static_off.find(key);
  if (it == L.static_off.end()) {
    const size_t off = (L.static_used + align - 1) / align * align;
    if (off + bytes > kStaticSmemMax) {
      std::ostringstream e;
      e << "launch limit: static shared memory of " << off + bytes << " bytes exceeds " << kStaticSmemMax;
      fail(e.str());
    }
    if (L.dyn + off + bytes > L.opt_in) {
      std::ostringstream e;
      e << "launch limit: " << L.dyn << " bytes of dynamic plus " << off + bytes
        << " of static shared memory exceed the " << L.opt_in << " the kernel may use (48 KiB without the opt-in "
        << "attribute, else the attribute, at most the device's " << device().max_smem_optin << ")";
      fail(e.str());
    }
    it = L.static_off.emplace(key, off).first;
    L.static_used = off + bytes;
  }
  return L.base + L.static0 + it->second;
}

KDK_EMU_NO_CHECK void syncthreads() {
  Pause p;
  g_launch->cur->state = State::kBarrier;
  yield();
}

namespace {
uint64_t warp_op(WarpOp op, Shfl kind, unsigned mask, uint64_t in, int arg, int width, bool pred) {
  Thread& t = *g_launch->cur;
  if (width <= 0 || width > 32 || (width & (width - 1))) {
    std::ostringstream e;
    e << op_name(op, kind) << " width must be a power of two in [1, 32]: got " << width;
    fail(e.str());
  }
  t.state = State::kWarp; t.op = op; t.kind = kind; t.mask = mask; t.in = in; t.arg = arg; t.width = width;
  t.pred = pred;
  yield();
  return t.out;
}
}  // namespace

KDK_EMU_NO_CHECK void syncwarp(unsigned mask) {
  Pause p;
  warp_op(WarpOp::kSync, Shfl::kIdx, mask, 0, 0, 32, false);
}

KDK_EMU_NO_CHECK void shfl(Shfl kind, unsigned mask, const void* in, void* out, size_t bytes, int arg, int width) {
  Pause p;
  uint64_t v = 0;
  std::memcpy(&v, in, bytes);
  const uint64_t r = warp_op(WarpOp::kShfl, kind, mask, v, arg, width, false);
  std::memcpy(out, &r, bytes);
}

KDK_EMU_NO_CHECK void warp_gather(unsigned mask, const void* in, void* all, size_t bytes) {
  Pause p;
  Thread& t = *g_launch->cur;
  t.gin = in; t.gout = all; t.gbytes = bytes;
  warp_op(WarpOp::kGather, Shfl::kIdx, mask, 0, 0, 32, false);
  t.gbytes = 0;
}

KDK_EMU_NO_CHECK bool in_shared(const void* p, size_t bytes) {
  const Launch& L = *g_launch;
  const auto a = reinterpret_cast<uintptr_t>(p), s0 = reinterpret_cast<uintptr_t>(L.base);
  return a >= s0 && a + bytes <= s0 + L.span;
}

KDK_EMU_NO_CHECK void device_fail(const char* what) {
  Pause p;
  fail(what);
  std::abort();  // fail() leaves the fiber for good
}

// The copy may land any time between issue and wait: the issue counts as this thread's write of the
// destination (a reader of the old contents not ordered before it is a race), the bytes stay in flight
// (any access before the wait is an error) and are written when a wait retires the group.
namespace {
void set_inflight(Launch& L, const void* dst, int bytes, int16_t v) {
  const size_t off = reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(L.base);
  for (int i = 0; i < bytes; ++i) L.shadow[off + i].inflight = v;
}
}  // namespace

KDK_EMU_NO_CHECK void cp_async_push(void* dst, const void* src, int bytes, int src_bytes) {
  Pause p;
  Launch& L = *g_launch;
  shared_access(L, reinterpret_cast<uintptr_t>(dst), size_t(bytes), true);
  set_inflight(L, dst, bytes, 1);
  L.cur->async.push_back({dst, src, bytes, src_bytes, -1});
}

KDK_EMU_NO_CHECK void cp_async_commit() {
  Pause p;
  Thread& t = *g_launch->cur;
  ++t.groups;
  for (auto& c : t.async)
    if (c.group < 0) c.group = t.groups;
}

KDK_EMU_NO_CHECK bool cp_async_take(int keep, void** dst, const void** src, int* bytes, int* src_bytes) {
  Pause p;
  Thread& t = *g_launch->cur;
  for (size_t i = 0; i < t.async.size(); ++i) {
    const auto c = t.async[i];
    if (c.group < 0 || c.group > t.groups - keep) continue;
    t.async.erase(t.async.begin() + static_cast<std::ptrdiff_t>(i));
    set_inflight(*g_launch, c.dst, c.bytes, 0);
    *dst = c.dst; *src = c.src; *bytes = c.bytes; *src_bytes = c.src_bytes;
    return true;
  }
  return false;
}

KDK_EMU_NO_CHECK unsigned vote_ballot(unsigned mask, bool pred) {
  Pause p;
  return static_cast<unsigned>(warp_op(WarpOp::kBallot, Shfl::kIdx, mask, 0, 0, 32, pred));
}

KDK_EMU_NO_CHECK void atomic_add(void* addr, const void* val, void* old, int kind) {
  Pause p;
  static const size_t sizes[] = {4, 8, 4, 8};
  const size_t n = sizes[kind];
  const auto a = reinterpret_cast<uintptr_t>(addr);
  Launch& L = *g_launch;
  const uintptr_t s0 = reinterpret_cast<uintptr_t>(L.base);
  if (a + n > s0 && a < s0 + L.span) {
    atomic_shared(L, a, n);
  } else {
    check_impl(a, n, true);
  }
  std::memcpy(old, addr, n);
  switch (kind) {
    case 0: { float x; std::memcpy(&x, addr, 4); x += *static_cast<const float*>(val); std::memcpy(addr, &x, 4); break; }
    case 1: { double x; std::memcpy(&x, addr, 8); x += *static_cast<const double*>(val); std::memcpy(addr, &x, 8); break; }
    case 2: { int x; std::memcpy(&x, addr, 4); x += *static_cast<const int*>(val); std::memcpy(addr, &x, 4); break; }
    default: { uint64_t x; std::memcpy(&x, addr, 8); x += *static_cast<const uint64_t*>(val); std::memcpy(addr, &x, 8); }
  }
}

// ---- launch ------------------------------------------------------------------------------------------
namespace {
std::mutex g_attr_mutex;
std::unordered_map<const void*, size_t> g_max_dyn;  // cudaFuncAttributeMaxDynamicSharedMemorySize
std::map<std::string, int64_t> g_counts;            // launches per kernel

[[noreturn]] void refuse(const std::string& name, const std::string& what) {
  TORCH_CHECK(false, "kdkernels emulator: launch limit: ", what, " (kernel ", name, ")");
}
}  // namespace

void set_max_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes > device().max_smem_optin)
    refuse(kernel_name(kernel), "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(bytes) +
                                    ") exceeds the device's opt-in limit of " + std::to_string(device().max_smem_optin) +
                                    " bytes (sm_" + std::to_string(device().arch) + ")");
  std::lock_guard<std::mutex> g(g_attr_mutex);
  g_max_dyn[kernel] = bytes;
}

void run(const void* kernel, dim3 grid, dim3 block, size_t smem, Body body, const void* closure) {
  const std::string name = kernel_name(kernel);
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  const int bounds = launch_bounds(kernel);
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    refuse(name, "empty grid " + dim_str(grid) + " or block " + dim_str(block));
  if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > kMaxThreads)
    refuse(name, "block " + dim_str(block) + " exceeds 1024 threads (or 1024 x 1024 x 64)");
  if (bounds > 0 && threads > bounds)
    refuse(name, "block of " + std::to_string(threads) + " threads exceeds the kernel's __launch_bounds__(" +
                     std::to_string(bounds) + ")");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    refuse(name, "grid " + dim_str(grid) + " exceeds 2^31-1 x 65535 x 65535");
  size_t opt_in = kDefaultDynSmem;
  {
    std::lock_guard<std::mutex> g(g_attr_mutex);
    auto it = g_max_dyn.find(kernel);
    if (it != g_max_dyn.end()) opt_in = std::max(opt_in, it->second);
  }
  if (smem > device().max_smem_optin)
    refuse(name, std::to_string(smem) + " bytes of dynamic shared memory exceed the device's " +
                     std::to_string(device().max_smem_optin) + " (sm_" + std::to_string(device().arch) + ")");
  if (smem > opt_in)
    refuse(name, std::to_string(smem) + " bytes of dynamic shared memory without the opt-in " +
                     "(cudaFuncSetAttribute MaxDynamicSharedMemorySize is " + std::to_string(opt_in) + ")");

  std::lock_guard<std::mutex> run_guard(g_run_mutex);
  static std::vector<unsigned char> smem_buffer;
  static std::vector<Shadow> shadow_buffer;
  Launch L{.smem = smem_buffer, .shadow = shadow_buffer};
  L.name = name; L.grid = grid; L.block = block; L.dyn = smem; L.body = body;
  L.closure = closure; L.nthreads = static_cast<int>(threads);
  L.threads.resize(L.nthreads);
  L.static0 = (smem + 255) / 256 * 256 + 256;
  L.span = L.static0 + kStaticSmemMax;
  L.opt_in = opt_in;
  L.smem.assign(L.span + 256, 0xFF);
  L.base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(L.smem.data()) + 255) & ~uintptr_t(255));
  L.shadow.assign(L.span, kNeverWritten);
  g_launch = &L;
  g_owner = pthread_self();
  g_hit_lo = g_hit_hi = 0;
  for (unsigned z = 0; z < grid.z && L.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && L.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && L.error.empty(); ++x) {
        L.bidx = dim3(x, y, z);
        run_block(L);
      }
  g_active = false;
  g_launch = nullptr;
  {
    std::lock_guard<std::mutex> g(g_attr_mutex);
    ++g_counts[name];
  }
  TORCH_CHECK(L.error.empty(), L.error);
}

// ---- ops ----------------------------------------------------------------------------------------------
OpScope::OpScope() {
  static std::once_flag installed;
  std::call_once(installed, [] {
    g_next_alloc = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_tracking, /*priority=*/0);  // the default's priority: a user's own allocator wins
  });
  if (g_scope_depth++ == 0) g_scope_owner = pthread_self();
}

OpScope::~OpScope() {
  for (auto& r : ranges) remove_range(r.first);
  --g_scope_depth;
}

void OpScope::add(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage() || t.device().type() != c10::DeviceType::CPU) return;
  const auto lo = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t hi = lo + t.storage().nbytes();
  add_range(lo, hi);
  ranges.emplace_back(lo, hi);
}

std::map<std::string, int64_t> launch_counts() {
  std::lock_guard<std::mutex> g(g_attr_mutex);
  return g_counts;
}

void reset_launch_counts() {
  std::lock_guard<std::mutex> g(g_attr_mutex);
  g_counts.clear();
}

}  // namespace kdk_emu

// The hooks GCC's -fsanitize=kernel-address (call mode) emits for every load and store; hidden, so the
// instrumented code of this module calls them directly rather than through the PLT.
#define KDK_EMU_HIDDEN KDK_EMU_NO_CHECK __attribute__((visibility("hidden")))
extern "C" {
#define KDK_EMU_HOOK(n)                                                                                      \
  KDK_EMU_HIDDEN void __asan_load##n##_noabort(uintptr_t a) { kdk_emu::hook(a, n, false); }                 \
  KDK_EMU_HIDDEN void __asan_store##n##_noabort(uintptr_t a) { kdk_emu::hook(a, n, true); }
KDK_EMU_HOOK(1)
KDK_EMU_HOOK(2)
KDK_EMU_HOOK(4)
KDK_EMU_HOOK(8)
KDK_EMU_HOOK(16)
#undef KDK_EMU_HOOK
KDK_EMU_HIDDEN void __asan_loadN_noabort(uintptr_t a, size_t n) { kdk_emu::hook(a, n, false); }
KDK_EMU_HIDDEN void __asan_storeN_noabort(uintptr_t a, size_t n) { kdk_emu::hook(a, n, true); }
void __asan_handle_no_return() {}
void __asan_before_dynamic_init(const char*) {}
void __asan_after_dynamic_init() {}
}
