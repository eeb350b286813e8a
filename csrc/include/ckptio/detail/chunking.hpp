// Internal: how batches of ranges are cut into thread-pool tasks of about `chunk_bytes`, shared
// by parallel_io and archive_writer. Not part of the public API.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ckptio/thread_pool.hpp"

namespace ckptio {
namespace detail {

/// A contiguous part of one request.
struct Piece {
  std::size_t request;   ///< index into the caller's request list
  std::uint64_t offset;  ///< offset of the piece inside its request
  std::uint64_t length;  ///< > 0
};

/// Pieces in request order; task t owns pieces [task_start[t], task_start[t + 1]).
struct TaskPlan {
  std::vector<Piece> pieces;
  std::vector<std::size_t> task_start;
  std::size_t task_count() const { return task_start.empty() ? 0 : task_start.size() - 1; }
};

/// Below this a task is not worth the hand-off to another thread.
constexpr std::uint64_t kMinBalancedChunk = std::uint64_t{1} << 20;

/// Cuts `count` requests (length_of(i) bytes each) into tasks of about `chunk_bytes`: long
/// requests are split, short ones grouped, zero-length ones dropped. When the whole batch is
/// smaller than `chunk_bytes` per thread, the chunk shrinks (not below 1 MiB) so every thread
/// of the pool gets a share.
template <typename LengthOf>
TaskPlan plan_tasks(std::size_t count, LengthOf length_of, std::size_t chunk_bytes,
                    std::size_t threads) {
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint64_t length = length_of(i);
    total = length > UINT64_MAX - total ? UINT64_MAX : total + length;  // only steers balance
  }
  std::uint64_t chunk = chunk_bytes;
  if (threads > 1) {
    const std::uint64_t share = total / threads + (total % threads != 0);
    chunk = std::min<std::uint64_t>(chunk, std::max(share, kMinBalancedChunk));
  }

  TaskPlan plan;
  plan.task_start.push_back(0);
  std::uint64_t in_task = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint64_t length = length_of(i);
    std::uint64_t done = 0;
    while (done < length) {
      const std::uint64_t take = std::min(length - done, chunk - in_task);
      plan.pieces.push_back(Piece{i, done, take});
      done += take;
      in_task += take;
      if (in_task == chunk) {
        plan.task_start.push_back(plan.pieces.size());
        in_task = 0;
      }
    }
  }
  if (in_task != 0) plan.task_start.push_back(plan.pieces.size());
  return plan;
}

/// A buffer to checksum.
struct CrcInput {
  const void* data;
  std::uint64_t size;
};

/// CRC-32 of every buffer, computed in parallel chunks and combined in order. Throws
/// InvalidArgument when CRC-32 is unavailable or chunk_bytes is 0.
std::vector<std::uint32_t> parallel_crc32(const std::vector<CrcInput>& inputs, ThreadPool& pool,
                                          std::size_t chunk_bytes);

}  // namespace detail
}  // namespace ckptio
