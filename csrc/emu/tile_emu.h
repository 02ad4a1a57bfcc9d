// The emulator's runtime entry points behind the tensor-core tile primitives of csrc/common/tile_mma.cuh:
// a warp-wide all-gather (the register exchange of mma.sync and ldmatrix) and the per-thread queue of
// cp.async copies, which land in shared memory only when cp.async.wait_group retires their group.
#pragma once
#include <cstddef>

namespace kdk_emu {

// Every lane of `mask` contributes `bytes` from `in`; each receives all lanes' contributions in `all`
// (lane j's at all + j * bytes; lanes outside the mask left untouched). A warp collective: it completes
// when every lane of the mask has arrived with the same mask and size.
void warp_gather(unsigned mask, const void* in, void* all, size_t bytes);
// Whether [p, p + bytes) lies in the block's shared memory.
bool in_shared(const void* p, size_t bytes);
// Fails the launch at the calling thread with "kdkernels emulator: <what> (in kernel ..., thread ...)".
[[noreturn]] void device_fail(const char* what);
// cp.async: queue a copy of `bytes` (the first `src_bytes` read from src, the rest zero-filled); commit the
// queued copies as one group; take the oldest queued copy of a group older than the newest `keep` committed
// groups (false when none is left). The caller performs the copy in checked code.
void cp_async_push(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
bool cp_async_take(int keep, void** dst, const void** src, int* bytes, int* src_bytes);

}  // namespace kdk_emu
