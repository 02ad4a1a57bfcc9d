// What the emulator's runtime offers its Python module besides the built-ins: the access hook and statistics.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

namespace kdk_emu {
void check_access(uintptr_t addr, size_t bytes, bool write);
std::map<std::string, int64_t> launch_counts();  // launches per kernel since the last reset
void reset_launch_counts();
}  // namespace kdk_emu
