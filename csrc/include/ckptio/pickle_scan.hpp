// A linear pre-scan of a pickle's opcodes, run before any unpickler sees the bytes.
//
// CPython's C unpickler trusts its input for resources: a LONG_BINPUT index sizes its memo table
// (LONG_BINPUT 0x7fffffff asks for 32 GiB), a BINBYTES8 length sizes a buffer before a byte is
// read. scan_pickle walks the opcodes without executing anything and refuses such a pickle with a
// FormatError naming the opcode and its offset, so that unpickling allocates at most a small
// multiple of the pickle's size and never builds objects nested deeper than a fixed limit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ckptio {

/// What scan_pickle accepts.
struct PickleScanOptions {
  /// Refuse every opcode torch's weights-only unpickler (torch/_weights_only_unpickler.py)
  /// refuses: it reads protocol-2 pickles only, without EXT*, INST/OBJ, text forms or frames.
  /// When false, any opcode up to protocol 5 passes; the scan stops (leniently) at an unknown
  /// one, where the unpickler itself will fail before reading further.
  bool weights_only = true;
  /// The deepest nesting of containers (and of open MARKs) accepted.
  std::size_t max_depth = 1000;
  /// Fill PickleScan::globals (GLOBAL, INST and STACK_GLOBAL whose operands are strings the
  /// pickle pushed or fetched from its memo); off, the scan keeps no strings.
  bool collect_globals = false;
};

/// What the scan saw, for tests and diagnostics.
struct PickleScan {
  std::size_t opcodes = 0;      ///< opcodes read, STOP included
  std::size_t memo_puts = 0;    ///< PUT, BINPUT, LONG_BINPUT and MEMOIZE opcodes
  std::size_t memo_size = 0;    ///< highest memo index stored, plus one (0: none stored)
  std::size_t max_depth = 0;    ///< deepest nesting seen
  std::size_t end = 0;          ///< offset just past STOP (0 when the scan stopped early)
  bool complete = false;        ///< false when a lenient scan stopped at an unknown opcode
  /// (module, name) of each global the pickle names, in order of first appearance, each once;
  /// filled when options.collect_globals (raw bytes as in the pickle, not decoded).
  std::vector<std::pair<std::string, std::string>> globals;
};

/// Scans `size` bytes of pickle. Throws FormatError on: a truncated pickle (no STOP, an argument
/// or a length running past the end), a memo index not below `size` (the memo array CPython's
/// unpickler grows to fit it would outgrow the file; memo indices may otherwise be sparse, out
/// of order and start anywhere, as CPython accepts), a memo index CPython refuses (negative,
/// beyond a Py_ssize_t, not a number), a GET of an index never stored, a stack underflow,
/// nesting deeper than options.max_depth, and (weights_only) an opcode torch's weights-only
/// unpickler does not support.
PickleScan scan_pickle(const void* data, std::size_t size, const PickleScanOptions& options = {});

/// The pickletools name of an opcode ("LONG_BINPUT"), or "" when the byte is no opcode.
const char* pickle_opcode_name(std::uint8_t op);

}  // namespace ckptio
