// A linear pre-scan of a pickle's opcodes, run before any unpickler sees the bytes.
//
// CPython's C unpickler trusts its input for resources: a BINBYTES8 length sizes a buffer before
// a byte is read, a frame's length a read-ahead. scan_pickle walks the opcodes without executing
// anything and refuses a pickle that cannot be what it claims (an argument, a length or a frame
// running past its end, a GET of an index never stored...) with a FormatError naming the opcode
// and its offset. It refuses nothing CPython's unpickler accepts: memo indices may be anything
// CPython takes, and nesting has no limit (CPython's unpickler is iterative). A LONG_BINPUT
// index also sizes the C unpickler's memo array (LONG_BINPUT 0x7fffffff asks for 32 GiB): the
// scan reports the largest (memo_size) so that the caller can pick an unpickler whose memo is a
// dict when the pickle does not justify that array.
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
  /// Fill PickleScan::globals (GLOBAL, INST and STACK_GLOBAL whose operands are strings the
  /// pickle pushed or fetched from its memo); off, the scan keeps no strings.
  bool collect_globals = false;
};

/// What the scan saw, for tests and diagnostics.
struct PickleScan {
  std::size_t opcodes = 0;      ///< opcodes read, STOP included
  std::size_t memo_puts = 0;    ///< PUT, BINPUT, LONG_BINPUT and MEMOIZE opcodes
  /// Highest memo index stored, plus one (0: none stored). CPython's C unpickler allocates an
  /// array of about 2 * memo_size pointers for it; above `size` the file does not justify that.
  std::size_t memo_size = 0;
  std::size_t max_depth = 0;    ///< deepest nesting seen
  std::size_t end = 0;          ///< offset just past STOP (0 when the scan stopped early)
  bool complete = false;        ///< false when a lenient scan stopped at an unknown opcode
  /// (module, name) of each global the pickle names, in order of first appearance, each once;
  /// filled when options.collect_globals (raw bytes as in the pickle, not decoded).
  std::vector<std::pair<std::string, std::string>> globals;
};

/// Scans `size` bytes of pickle. Throws FormatError on: a truncated pickle (no STOP, an argument
/// or a length running past the end), a memo index CPython refuses (negative, beyond a
/// Py_ssize_t, not a number), a GET of an index never stored, a stack underflow, and
/// (weights_only) an opcode torch's weights-only unpickler does not support. Memo indices may be
/// sparse, out of order, start anywhere and exceed `size` (see PickleScan::memo_size); the scan's
/// own memory stays linear in `size` whatever they are.
PickleScan scan_pickle(const void* data, std::size_t size, const PickleScanOptions& options = {});

/// The pickletools name of an opcode ("LONG_BINPUT"), or "" when the byte is no opcode.
const char* pickle_opcode_name(std::uint8_t op);

}  // namespace ckptio
