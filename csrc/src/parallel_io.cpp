#include "ckptio/parallel_io.hpp"

#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <string>

#include "ckptio/checksum.hpp"
#include "ckptio/detail/chunking.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/memory.hpp"

namespace ckptio {
namespace {

void check_chunk(std::size_t chunk_bytes) {
  if (chunk_bytes == 0) throw InvalidArgument("chunk_bytes must be positive");
}

void check_crc_available() {
  if (!crc32_available()) {
    throw InvalidArgument("ckptio was built without zlib; CRC-32 is unavailable");
  }
}

}  // namespace

void read_ranges(const ByteSource& source, const std::vector<ReadRequest>& requests,
                 ThreadPool& pool, std::size_t chunk_bytes, std::vector<std::uint32_t>* crcs) {
  read_ranges_many({SourceReads{&source, requests}}, pool, chunk_bytes, crcs);
}

void read_ranges_many(const std::vector<SourceReads>& batches, ThreadPool& pool,
                      std::size_t chunk_bytes, std::vector<std::uint32_t>* crcs) {
  check_chunk(chunk_bytes);
  // Every range is checked before the first read, so a bad file costs no I/O and leaves no
  // destination half-filled by some tasks and not others.
  std::size_t total = 0;
  bool cold = false;
  for (const SourceReads& batch : batches) {
    const ByteSource& source = *batch.source;
    const std::uint64_t size = source.size();
    for (const ReadRequest& r : batch.requests) {
      if (r.offset > size || r.length > size - r.offset) {
        throw FormatError(source.name() + ": range of " + std::to_string(r.length) +
                          " bytes at offset " + std::to_string(r.offset) +
                          " runs past the end of the file (" + std::to_string(size) + " bytes)");
      }
      if (r.length > 0 && r.dst == nullptr) {
        throw InvalidArgument("read_ranges: null destination for a nonzero length");
      }
    }
    total += batch.requests.size();
    // A source out of the page cache (its middle request's first page is not cached).
    const std::vector<ReadRequest>& rs = batch.requests;
    cold = cold || (!rs.empty() && rs[rs.size() / 2].length > 0 &&
                    !source.cached(rs[rs.size() / 2].offset));
  }
  // One flat list, source after source, each in its callers' (file) order.
  std::vector<const ReadRequest*> requests;
  std::vector<const ByteSource*> sources;
  requests.reserve(total);
  sources.reserve(total);
  for (const SourceReads& batch : batches) {
    for (const ReadRequest& r : batch.requests) {
      requests.push_back(&r);
      sources.push_back(batch.source);
    }
  }

  // A cold read is done by at least kColdReaders threads of their own: each waits on the
  // device, then on faulting in fresh destination pages, so more reads in flight overlap the
  // two. On the development VM, 710 MB cold into fresh memory took 1.3-1.7 s with 2 threads
  // and 0.9 s with 8.
  constexpr std::size_t kColdReaders = 8;
  const std::size_t workers = cold ? std::max(pool.size(), kColdReaders) : pool.size();
  const detail::TaskPlan plan = detail::plan_tasks(
      requests.size(), [&](std::size_t i) { return requests[i]->length; }, chunk_bytes, workers);
  // One slot per piece, so tasks never share a CRC; combined per request afterwards.
  std::vector<std::uint32_t> piece_crcs(crcs != nullptr ? plan.pieces.size() : 0);
  auto source_of = [&](std::size_t p) { return sources[plan.pieces[p].request]; };
  auto dst_of = [&](std::size_t p) {
    return static_cast<std::uint8_t*>(requests[plan.pieces[p].request]->dst) +
           plan.pieces[p].offset;
  };
  auto at_of = [&](std::size_t p) {
    return requests[plan.pieces[p].request]->offset + plan.pieces[p].offset;
  };
  auto read_piece = [&](std::size_t p) {
    const detail::Piece& piece = plan.pieces[p];
    std::uint8_t* dst = dst_of(p);
    const std::uint64_t at = at_of(p);
    if (crcs == nullptr) {
      source_of(p)->read_exact(dst, static_cast<std::size_t>(piece.length), at);
      return;
    }
    std::uint32_t crc = 0;
    for (std::uint64_t done = 0; done < piece.length;) {
      const auto step = static_cast<std::size_t>(
          std::min<std::uint64_t>(kCrcStepBytes, piece.length - done));
      source_of(p)->read_exact(dst + done, step, at + done);
      crc = crc32_update(crc, dst + done, step);
      done += step;
    }
    piece_crcs[p] = crc;
  };
  // Cold, pieces that follow one another in the file at most kColdGap bytes apart (small
  // records: a data descriptor, the next local header and its padding between two payloads)
  // are read by one preadv, each gap into scratch memory: one device request per run of
  // records instead of one per record. On the development VM, the 20,000 records (~32 KiB
  // each) of a 700 MB file took 0.51 s cold with one pread each, 0.38 s in 8 MiB reads.
  constexpr std::uint64_t kColdGap = std::uint64_t{16} << 10;
  constexpr std::size_t kMaxRunPieces = 512;  // 2 buffers each, under IOV_MAX
  auto run_end_of = [&](std::size_t p, std::size_t end) {
    std::size_t q = p + 1;
    if (!cold) return q;
    std::uint64_t at = at_of(p) + plan.pieces[p].length;
    while (q < end && q - p < kMaxRunPieces && source_of(q) == source_of(p) && at_of(q) >= at &&
           at_of(q) - at <= kColdGap) {
      at = at_of(q) + plan.pieces[q].length;
      ++q;
    }
    return q;
  };
  auto task = [&](std::size_t t) {
    std::vector<std::uint8_t> gap;
    std::vector<struct iovec> iov;
    const std::size_t end = plan.task_start[t + 1];
    for (std::size_t p = plan.task_start[t]; p < end;) {
      const std::size_t q = run_end_of(p, end);
      if (q - p == 1) {
        read_piece(p);
        p = q;
        continue;
      }
      if (gap.empty()) gap.resize(static_cast<std::size_t>(kColdGap));
      iov.clear();
      for (std::size_t k = p; k < q; ++k) {
        if (k > p) {
          const std::uint64_t skip = at_of(k) - (at_of(k - 1) + plan.pieces[k - 1].length);
          if (skip > 0) iov.push_back({gap.data(), static_cast<std::size_t>(skip)});
        }
        iov.push_back({dst_of(k), static_cast<std::size_t>(plan.pieces[k].length)});
      }
      source_of(p)->read_vectored(iov.data(), static_cast<int>(iov.size()), at_of(p));
      if (crcs != nullptr) {
        for (std::size_t k = p; k < q; ++k) {
          piece_crcs[k] =
              crc32_update(0, dst_of(k), static_cast<std::size_t>(plan.pieces[k].length));
        }
      }
      p = q;
    }
  };
  if (workers > pool.size()) {
    // `workers` threads take the tasks in file order; after an error none takes another.
    // One more thread faults in the destinations of the tasks not taken yet, in the same
    // order (populate_for_write): the readers wait on the device most of the time, and a
    // fresh destination's 4 KiB faults, taken inside each read's copy, would otherwise add
    // to it. On the development VM, 701 MB cold into fresh memory by 8 threads of 8 MiB
    // reads took 0.541 s, 0.462 s with the faults taken ahead, 0.467 s into memory faulted
    // in before (medians of 5). Where the kernel cannot populate it stops at once.
    std::atomic<std::size_t> next{0};
    std::atomic<bool> failed{false};
    const std::size_t readers = std::min(workers, plan.task_count());
    auto fault_ahead = [&] {
      for (std::size_t t = 0; t < plan.task_count() && !failed; ++t) {
        t = std::max(t, next.load());  // a task taken is its reader's to fault
        if (t >= plan.task_count()) return;
        for (std::size_t p = plan.task_start[t]; p < plan.task_start[t + 1]; ++p) {
          const auto length = static_cast<std::size_t>(plan.pieces[p].length);
          if (!populate_for_write(dst_of(p), length)) return;
        }
      }
    };
    run_on_own_threads(readers + 1, [&](std::size_t i) {
      if (i == readers) return fault_ahead();
      for (std::size_t t = next++; t < plan.task_count() && !failed; t = next++) {
        try {
          task(t);
        } catch (...) {
          failed = true;
          throw;
        }
      }
    });
  } else {
    pool.parallel_for(plan.task_count(), task);
  }
  if (crcs != nullptr) {
    crcs->assign(requests.size(), 0);
    // Pieces are in request order, so folding left to right yields each request's CRC.
    for (std::size_t p = 0; p < plan.pieces.size(); ++p) {
      const detail::Piece& piece = plan.pieces[p];
      (*crcs)[piece.request] = crc32_combine((*crcs)[piece.request], piece_crcs[p], piece.length);
    }
  }
}

std::vector<std::uint32_t> checksum_ranges(const ByteSource& source,
                                           const std::vector<ByteRange>& ranges, ThreadPool& pool,
                                           std::size_t chunk_bytes) {
  check_chunk(chunk_bytes);
  const std::uint64_t size = source.size();
  for (const ByteRange& r : ranges) {
    if (r.offset > size || r.length > size - r.offset) {
      throw FormatError(source.name() + ": range of " + std::to_string(r.length) +
                        " bytes at offset " + std::to_string(r.offset) +
                        " runs past the end of the file (" + std::to_string(size) + " bytes)");
    }
  }
  const detail::TaskPlan plan = detail::plan_tasks(
      ranges.size(), [&](std::size_t i) { return ranges[i].length; }, chunk_bytes, pool.size());
  std::vector<std::uint32_t> piece_crcs(plan.pieces.size());
  pool.parallel_for(plan.task_count(), [&](std::size_t t) {
    std::vector<std::uint8_t> buffer;
    for (std::size_t p = plan.task_start[t]; p < plan.task_start[t + 1]; ++p) {
      const detail::Piece& piece = plan.pieces[p];
      const std::uint64_t at = ranges[piece.request].offset + piece.offset;
      const auto want =
          static_cast<std::size_t>(std::min<std::uint64_t>(piece.length, kCrcStepBytes));
      if (buffer.size() < want) buffer.resize(want);
      std::uint32_t crc = 0;
      for (std::uint64_t done = 0; done < piece.length;) {
        const auto step =
            static_cast<std::size_t>(std::min<std::uint64_t>(want, piece.length - done));
        source.read_exact(buffer.data(), step, at + done);
        crc = crc32_update(crc, buffer.data(), step);
        done += step;
      }
      piece_crcs[p] = crc;
    }
  });
  std::vector<std::uint32_t> crcs(ranges.size(), 0);
  for (std::size_t p = 0; p < plan.pieces.size(); ++p) {
    const detail::Piece& piece = plan.pieces[p];
    crcs[piece.request] = crc32_combine(crcs[piece.request], piece_crcs[p], piece.length);
  }
  return crcs;
}

void write_ranges(const File& file, const std::vector<WriteRequest>& requests, ThreadPool& pool,
                  std::size_t chunk_bytes, std::vector<std::uint32_t>* crcs) {
  check_chunk(chunk_bytes);
  if (crcs != nullptr) check_crc_available();
  for (const WriteRequest& r : requests) {
    if (r.length > UINT64_MAX - r.offset) {
      throw InvalidArgument("write_ranges: range end overflows 64 bits");
    }
    if (r.length > 0 && r.src == nullptr) {
      throw InvalidArgument("write_ranges: null source for a nonzero length");
    }
  }

  const detail::TaskPlan plan = detail::plan_tasks(
      requests.size(), [&](std::size_t i) { return requests[i].length; }, chunk_bytes,
      pool.size());
  // One slot per piece, so tasks never share a CRC; combined per request afterwards.
  std::vector<std::uint32_t> piece_crcs(crcs != nullptr ? plan.pieces.size() : 0);

  auto piece_src = [&](const detail::Piece& piece) {
    return static_cast<const std::uint8_t*>(requests[piece.request].src) + piece.offset;
  };
  auto piece_pos = [&](const detail::Piece& piece) {
    return requests[piece.request].offset + piece.offset;
  };

  pool.parallel_for(plan.task_count(), [&](std::size_t t) {
    const std::size_t end = plan.task_start[t + 1];
    std::vector<struct iovec> iov;
    std::size_t p = plan.task_start[t];
    while (p < end) {
      // A run of pieces that continue one another in the file goes out in one pwritev: a
      // planned archive's header, payload and descriptor are adjacent.
      std::size_t q = p + 1;
      std::uint64_t run_end = piece_pos(plan.pieces[p]) + plan.pieces[p].length;
      while (q < end && q - p < static_cast<std::size_t>(INT_MAX) &&
             piece_pos(plan.pieces[q]) == run_end) {
        run_end += plan.pieces[q].length;
        ++q;
      }
      if (crcs != nullptr) {
        for (std::size_t k = p; k < q; ++k) {
          piece_crcs[k] = crc32_update(0, piece_src(plan.pieces[k]),
                                       static_cast<std::size_t>(plan.pieces[k].length));
        }
      }
      if (q - p == 1) {
        file.write_all(piece_src(plan.pieces[p]), static_cast<std::size_t>(plan.pieces[p].length),
                       piece_pos(plan.pieces[p]));
      } else {
        iov.clear();
        for (std::size_t k = p; k < q; ++k) {
          iov.push_back({const_cast<std::uint8_t*>(piece_src(plan.pieces[k])),
                         static_cast<std::size_t>(plan.pieces[k].length)});
        }
        file.writev_all(iov.data(), static_cast<int>(iov.size()), piece_pos(plan.pieces[p]));
      }
      p = q;
    }
  });

  if (crcs != nullptr) {
    crcs->assign(requests.size(), 0);
    // Pieces are in request order, so folding left to right yields each request's CRC.
    for (std::size_t p = 0; p < plan.pieces.size(); ++p) {
      const detail::Piece& piece = plan.pieces[p];
      (*crcs)[piece.request] = crc32_combine((*crcs)[piece.request], piece_crcs[p], piece.length);
    }
  }
}

namespace detail {

std::vector<std::uint32_t> parallel_crc32(const std::vector<CrcInput>& inputs, ThreadPool& pool,
                                          std::size_t chunk_bytes) {
  check_chunk(chunk_bytes);
  check_crc_available();
  const TaskPlan plan = plan_tasks(
      inputs.size(), [&](std::size_t i) { return inputs[i].size; }, chunk_bytes, pool.size());
  std::vector<std::uint32_t> piece_crcs(plan.pieces.size());
  pool.parallel_for(plan.task_count(), [&](std::size_t t) {
    for (std::size_t p = plan.task_start[t]; p < plan.task_start[t + 1]; ++p) {
      const Piece& piece = plan.pieces[p];
      piece_crcs[p] = crc32_update(
          0, static_cast<const std::uint8_t*>(inputs[piece.request].data) + piece.offset,
          static_cast<std::size_t>(piece.length));
    }
  });
  std::vector<std::uint32_t> crcs(inputs.size(), 0);
  for (std::size_t p = 0; p < plan.pieces.size(); ++p) {
    const Piece& piece = plan.pieces[p];
    crcs[piece.request] = crc32_combine(crcs[piece.request], piece_crcs[p], piece.length);
  }
  return crcs;
}

}  // namespace detail
}  // namespace ckptio
