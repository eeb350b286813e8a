#include "ckptio/pickle_scan.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ckptio/errors.hpp"

namespace ckptio {
namespace {

// How an opcode's argument is laid out in the stream (pickletools' ArgumentDescriptors).
enum class Arg : std::uint8_t {
  kNone,
  kFixed1,
  kFixed2,
  kFixed4,
  kFixed8,
  kLine,       // up to and including '\n'
  kTwoLines,   // GLOBAL, INST: module '\n' name '\n'
  kDecimal,    // GET, PUT: a decimal memo index then '\n'
  kLen1,       // 1-byte length, then that many bytes
  kLen4,       // 4-byte unsigned length
  kLen4Signed, // 4-byte signed length (BINSTRING, LONG4): negative is malformed
  kLen8,       // 8-byte length
  kFrame,      // FRAME: 8-byte length of the frame that follows
};

struct OpInfo {
  const char* name = nullptr;
  Arg arg = Arg::kNone;
  bool weights_only = false;  // accepted by torch's weights-only unpickler
};

struct OpTable {
  OpInfo ops[256];
  constexpr OpTable() : ops{} {
    auto set = [this](std::uint8_t code, const char* name, Arg arg, bool wo) {
      ops[code] = OpInfo{name, arg, wo};
    };
    set('(', "MARK", Arg::kNone, true);
    set('.', "STOP", Arg::kNone, true);
    set('0', "POP", Arg::kNone, false);
    set('1', "POP_MARK", Arg::kNone, false);
    set('2', "DUP", Arg::kNone, false);
    set('F', "FLOAT", Arg::kLine, false);
    set('I', "INT", Arg::kLine, false);
    set('J', "BININT", Arg::kFixed4, true);
    set('K', "BININT1", Arg::kFixed1, true);
    set('L', "LONG", Arg::kLine, false);
    set('M', "BININT2", Arg::kFixed2, true);
    set('N', "NONE", Arg::kNone, true);
    set('P', "PERSID", Arg::kLine, false);
    set('Q', "BINPERSID", Arg::kNone, true);
    set('R', "REDUCE", Arg::kNone, true);
    set('S', "STRING", Arg::kLine, false);
    set('T', "BINSTRING", Arg::kLen4Signed, false);
    set('U', "SHORT_BINSTRING", Arg::kLen1, true);
    set('V', "UNICODE", Arg::kLine, false);
    set('X', "BINUNICODE", Arg::kLen4, true);
    set('a', "APPEND", Arg::kNone, true);
    set('b', "BUILD", Arg::kNone, true);
    set('c', "GLOBAL", Arg::kTwoLines, true);
    set('d', "DICT", Arg::kNone, false);
    set('}', "EMPTY_DICT", Arg::kNone, true);
    set('e', "APPENDS", Arg::kNone, true);
    set('g', "GET", Arg::kDecimal, false);
    set('h', "BINGET", Arg::kFixed1, true);
    set('i', "INST", Arg::kTwoLines, false);
    set('j', "LONG_BINGET", Arg::kFixed4, true);
    set('l', "LIST", Arg::kNone, false);
    set(']', "EMPTY_LIST", Arg::kNone, true);
    set('o', "OBJ", Arg::kNone, false);
    set('p', "PUT", Arg::kDecimal, false);
    set('q', "BINPUT", Arg::kFixed1, true);
    set('r', "LONG_BINPUT", Arg::kFixed4, true);
    set('s', "SETITEM", Arg::kNone, true);
    set('t', "TUPLE", Arg::kNone, true);
    set(')', "EMPTY_TUPLE", Arg::kNone, true);
    set('u', "SETITEMS", Arg::kNone, true);
    set('G', "BINFLOAT", Arg::kFixed8, true);
    set(0x80, "PROTO", Arg::kFixed1, true);
    set(0x81, "NEWOBJ", Arg::kNone, true);
    set(0x82, "EXT1", Arg::kFixed1, false);
    set(0x83, "EXT2", Arg::kFixed2, false);
    set(0x84, "EXT4", Arg::kFixed4, false);
    set(0x85, "TUPLE1", Arg::kNone, true);
    set(0x86, "TUPLE2", Arg::kNone, true);
    set(0x87, "TUPLE3", Arg::kNone, true);
    set(0x88, "NEWTRUE", Arg::kNone, true);
    set(0x89, "NEWFALSE", Arg::kNone, true);
    set(0x8a, "LONG1", Arg::kLen1, true);
    set(0x8b, "LONG4", Arg::kLen4Signed, false);
    set('B', "BINBYTES", Arg::kLen4, false);
    set('C', "SHORT_BINBYTES", Arg::kLen1, false);
    set(0x8c, "SHORT_BINUNICODE", Arg::kLen1, false);
    set(0x8d, "BINUNICODE8", Arg::kLen8, false);
    set(0x8e, "BINBYTES8", Arg::kLen8, false);
    set(0x8f, "EMPTY_SET", Arg::kNone, true);
    set(0x90, "ADDITEMS", Arg::kNone, false);
    set(0x91, "FROZENSET", Arg::kNone, false);
    set(0x92, "NEWOBJ_EX", Arg::kNone, false);
    set(0x93, "STACK_GLOBAL", Arg::kNone, false);
    set(0x94, "MEMOIZE", Arg::kNone, false);
    set(0x95, "FRAME", Arg::kFrame, false);
    set(0x96, "BYTEARRAY8", Arg::kLen8, false);
    set(0x97, "NEXT_BUFFER", Arg::kNone, false);
    set(0x98, "READONLY_BUFFER", Arg::kNone, false);
  }
};

constexpr OpTable kOps{};

std::uint64_t read_le(const std::uint8_t* p, int n) {
  std::uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

constexpr std::int32_t kNoText = -1;

// A stack or memo item: the nesting depth of the object it stands for and, when it is a
// string and globals are collected, its index in Scanner::texts_ (STACK_GLOBAL's operands).
struct Item {
  std::uint32_t depth;
  std::int32_t text;
};

// The scan's model of the unpickler: for each stack item only the nesting depth of the object it
// stands for, plus CPython's mark stack (positions in the item stack) and the memo's depths.
class Scanner {
 public:
  Scanner(const std::uint8_t* data, std::size_t size, const PickleScanOptions& options)
      : p_(data), n_(size), options_(options) {}

  PickleScan run() {
    while (pos_ < n_) {
      op_at_ = pos_;
      op_ = p_[pos_++];
      const OpInfo& info = kOps.ops[op_];
      if (info.name == nullptr) {
        if (!options_.weights_only) return result_;  // the unpickler fails right here
        fail("unknown opcode 0x" + hex(op_));
      }
      if (options_.weights_only && !info.weights_only) {
        fail("opcode " + std::string(info.name) +
             " is not supported by torch's weights-only unpickler");
      }
      ++result_.opcodes;
      const std::uint64_t value = read_argument(info.arg);
      if (op_ == '.') {
        pop(1);
        result_.end = pos_;
        result_.complete = true;
        return result_;
      }
      apply(value);
    }
    throw FormatError("pickle is truncated: it ends after " + std::to_string(n_) +
                      " bytes without a STOP opcode");
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    const OpInfo& info = kOps.ops[op_];
    const std::string name = info.name ? info.name : "0x" + hex(op_);
    throw FormatError("malformed pickle: " + what + " (opcode " + name + " at offset " +
                      std::to_string(op_at_) + ")");
  }

  static std::string hex(std::uint8_t v) {
    const char* digits = "0123456789abcdef";
    return std::string{digits[v >> 4], digits[v & 15]};
  }

  std::size_t left() const { return n_ - pos_; }

  void need(std::uint64_t bytes, const char* what) {
    if (bytes > left()) {
      fail(std::string(what) + " of " + std::to_string(bytes) + " bytes runs past the end of " +
           "the pickle (" + std::to_string(left()) + " bytes left)");
    }
  }

  // Returns the line's length (without '\n') and moves past it.
  std::size_t line() {
    const void* nl = std::memchr(p_ + pos_, '\n', left());
    if (nl == nullptr) fail("the argument line has no end");
    const std::size_t len = static_cast<const std::uint8_t*>(nl) - (p_ + pos_);
    pos_ += len + 1;
    return len;
  }

  // GET and PUT read their index as CPython does: PyLong_FromString(line, base 10) on the line
  // up to its first NUL, so blanks around it, a sign, leading zeros and '_' between digits are
  // all valid; a value too large for a Py_ssize_t is refused by CPython (OverflowError), and so
  // is a negative PUT. Values past 2**63 saturate: no pickle can store or fetch them.
  std::uint64_t decimal_index() {
    const std::size_t start = pos_;
    const std::size_t len = line();
    const std::uint8_t* s = p_ + start;
    const std::size_t end = static_cast<std::size_t>(
        std::find(s, s + len, std::uint8_t{0}) - s);
    auto space = [](std::uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r'); };
    auto digit = [](std::uint8_t c) { return c >= '0' && c <= '9'; };
    std::size_t i = 0;
    while (i < end && space(s[i])) ++i;
    bool negative = false;
    if (i < end && (s[i] == '+' || s[i] == '-')) negative = s[i++] == '-';
    if (i == end || !digit(s[i])) fail("malformed memo index");
    constexpr std::uint64_t kMax = 0x7fffffffffffffffull;  // PY_SSIZE_T_MAX
    std::uint64_t v = 0;
    for (; i < end && (digit(s[i]) || s[i] == '_'); ++i) {
      if (s[i] == '_') {
        if (i + 1 >= end || !digit(s[i + 1])) fail("malformed memo index");
        continue;
      }
      v = v > (kMax - (s[i] - '0')) / 10 ? kMax + 1 : v * 10 + (s[i] - '0');
    }
    while (i < end && space(s[i])) ++i;
    if (i != end) fail("malformed memo index");
    if (v > kMax) fail("memo index does not fit a Py_ssize_t");
    if (negative && v != 0) fail("negative memo index");
    return v;
  }

  std::uint64_t read_argument(Arg arg) {
    switch (arg) {
      case Arg::kNone:
        return 0;
      case Arg::kFixed1:
      case Arg::kFixed2:
      case Arg::kFixed4:
      case Arg::kFixed8: {
        const int width = arg == Arg::kFixed1 ? 1 : arg == Arg::kFixed2 ? 2 : arg == Arg::kFixed4 ? 4 : 8;
        need(width, "the argument");
        const std::uint64_t v = read_le(p_ + pos_, width);
        pos_ += width;
        return v;
      }
      case Arg::kLine:
        arg_at_ = pos_;
        arg_len_ = line();
        return 0;
      case Arg::kTwoLines:
        line1_at_ = pos_;
        line1_len_ = line();
        arg_at_ = pos_;
        arg_len_ = line();
        return 0;
      case Arg::kDecimal:
        return decimal_index();
      case Arg::kLen1:
      case Arg::kLen4:
      case Arg::kLen4Signed:
      case Arg::kLen8: {
        const int width = arg == Arg::kLen1 ? 1 : arg == Arg::kLen8 ? 8 : 4;
        need(width, "the length field");
        const std::uint64_t len = read_le(p_ + pos_, width);
        pos_ += width;
        if (arg == Arg::kLen4Signed && (len & 0x80000000u)) fail("negative length");
        need(len, "a value");
        arg_at_ = pos_;
        arg_len_ = static_cast<std::size_t>(len);
        pos_ += len;
        return len;
      }
      case Arg::kFrame: {
        need(8, "the length field");
        const std::uint64_t len = read_le(p_ + pos_, 8);
        pos_ += 8;
        need(len, "a frame");  // frames are only a read-ahead hint: the opcodes go on inside
        return len;
      }
    }
    return 0;
  }

  // -- the stack model -------------------------------------------------------------------
  std::size_t fence() const { return marks_.empty() ? 0 : marks_.back(); }

  // Depths only feed PickleScan::max_depth (no limit: CPython's unpickler is iterative and
  // loads any nesting the file can describe); they saturate rather than wrap.
  static std::uint32_t deeper(std::uint32_t depth) {
    return depth == std::numeric_limits<std::uint32_t>::max() ? depth : depth + 1;
  }

  void push(std::uint32_t depth, std::int32_t text = kNoText) {
    result_.max_depth = std::max<std::size_t>(result_.max_depth, depth);
    stack_.push_back(Item{depth, text});
  }

  // Pops n items above the current mark; returns the deepest.
  std::uint32_t pop(std::size_t n) {
    if (stack_.size() < fence() + n) fail("stack underflow");
    std::uint32_t deepest = 0;
    for (std::size_t i = 0; i < n; ++i) {
      deepest = std::max(deepest, stack_.back().depth);
      stack_.pop_back();
    }
    return deepest;
  }

  // Pops everything above the top mark and the mark itself; returns the deepest item.
  std::uint32_t pop_mark() {
    if (marks_.empty()) fail("no MARK to pop to");
    const std::size_t mark = marks_.back();
    marks_.pop_back();
    std::uint32_t deepest = 0;
    for (std::size_t i = mark; i < stack_.size(); ++i) deepest = std::max(deepest, stack_[i].depth);
    stack_.resize(mark);
    return deepest;
  }

  // The object on top of the stack grows to hold a child of the given depth (APPEND, SETITEM...).
  void grow_top(std::uint32_t child) {
    if (stack_.empty()) fail("stack underflow");
    const std::uint32_t depth = std::max(stack_.back().depth, deeper(child));
    result_.max_depth = std::max<std::size_t>(result_.max_depth, depth);
    stack_.back() = Item{depth, kNoText};
  }

  // Any index a pickle stores is valid (sparse, out of order, starting anywhere, up to
  // 2**63 - 1 for a text PUT), as CPython accepts: none is refused. The scan's own memo is an
  // array for indices below the pickle's size and a map beyond, so it stays bounded by the file
  // whatever the indices; memo_size reports the largest, from which the caller picks an
  // unpickler whose memo is bounded too (CPython's C unpickler sizes an array by it).
  void memo_put(std::uint64_t index) {
    if (stack_.size() <= fence()) fail("stack underflow");
    const Item item{deeper(stack_.back().depth), stack_.back().text};
    if (index < n_) {
      if (index >= memo_.size()) {
        memo_.resize(std::min<std::size_t>(n_, std::max<std::size_t>(index + 1, 2 * memo_.size())),
                     Item{0, kNoText});
      }
      if (memo_[index].depth == 0) ++memo_len_;
      memo_[index] = item;
    } else if (sparse_memo_.insert_or_assign(index, item).second) {
      ++memo_len_;
    }
    ++result_.memo_puts;
    result_.memo_size = std::max<std::size_t>(result_.memo_size, index + 1);
  }

  const Item* memo_find(std::uint64_t index) const {
    if (index < memo_.size()) return memo_[index].depth == 0 ? nullptr : &memo_[index];
    const auto it = sparse_memo_.find(index);
    return it == sparse_memo_.end() ? nullptr : &it->second;
  }

  void memo_get(std::uint64_t index) {
    const Item* stored = memo_find(index);
    if (stored == nullptr) fail("memo index " + std::to_string(index) + " was never stored");
    push(stored->depth - 1, stored->text);
  }

  // The string the current opcode pushes, kept only when globals are collected. STRING and
  // UNICODE keep their text form (quotes, escapes): a STACK_GLOBAL operand is plain.
  std::int32_t text() {
    if (!options_.collect_globals) return kNoText;
    texts_.emplace_back(reinterpret_cast<const char*>(p_ + arg_at_), arg_len_);
    return static_cast<std::int32_t>(texts_.size() - 1);
  }

  void note_global(std::string module, std::string name) {
    if (!options_.collect_globals) return;
    auto key = std::make_pair(std::move(module), std::move(name));
    if (seen_globals_.insert(key).second) result_.globals.push_back(std::move(key));
  }

  void apply(std::uint64_t value) {
    switch (op_) {
      case '(':  // MARK
        marks_.push_back(stack_.size());
        result_.max_depth = std::max(result_.max_depth, marks_.size());
        break;
      case '0':  // POP: CPython pops a mark when one sits on top of the stack
        if (!marks_.empty() && marks_.back() == stack_.size()) {
          marks_.pop_back();
        } else {
          pop(1);
        }
        break;
      case '1':  // POP_MARK
        pop_mark();
        break;
      case '2':  // DUP
        if (stack_.size() <= fence()) fail("stack underflow");
        push(stack_.back().depth, stack_.back().text);
        break;
      case 'S': case 'T': case 'U': case 'V': case 'X': case 0x8c: case 0x8d:  // strings
        push(0, text());
        break;
      case 'c':  // GLOBAL: module '\n' name '\n'
        note_global(std::string(reinterpret_cast<const char*>(p_ + line1_at_), line1_len_),
                    std::string(reinterpret_cast<const char*>(p_ + arg_at_), arg_len_));
        push(0);
        break;
      case 'F': case 'I': case 'J': case 'K': case 'L': case 'M': case 'N': case 'P':
      case 'G': case 0x82: case 0x83:
      case 0x84: case 0x88: case 0x89: case 0x8a: case 0x8b: case 'B': case 'C':
      case 0x8e: case 0x96: case 0x97:
        push(0);  // atoms (EXT* and NEXT_BUFFER push an existing object: depth unknown, 0)
        break;
      case '}': case ']': case ')': case 0x8f:  // empty containers
        push(1);
        break;
      case 'Q':  // BINPERSID: the id goes in, a storage comes out
        pop(1);
        push(0);
        break;
      case 'R':  // REDUCE: callable(*args)
      case 0x81:  // NEWOBJ: cls.__new__(cls, *args)
        push(deeper(pop(2)));
        break;
      case 0x92:  // NEWOBJ_EX: cls, args, kwargs
        push(deeper(pop(3)));
        break;
      case 0x93:  // STACK_GLOBAL: module and name are the two items on top
        if (options_.collect_globals && stack_.size() >= fence() + 2) {
          const Item module = stack_[stack_.size() - 2];
          const Item name = stack_.back();
          if (module.text != kNoText && name.text != kNoText) {
            note_global(texts_[module.text], texts_[name.text]);
          }
        }
        pop(2);
        push(0);
        break;
      case 0x98:  // READONLY_BUFFER
        push(pop(1));
        break;
      case 'a':  // APPEND
      case 'b': {  // BUILD
        const std::uint32_t child = pop(1);
        grow_top(child);
        break;
      }
      case 's': {  // SETITEM
        const std::uint32_t child = pop(2);
        grow_top(child);
        break;
      }
      case 'e': case 'u': case 0x90: {  // APPENDS, SETITEMS, ADDITEMS
        const std::uint32_t child = pop_mark();
        grow_top(child);
        break;
      }
      case 'i':  // INST: module '\n' name '\n', then a class instance from the MARK's items
        note_global(std::string(reinterpret_cast<const char*>(p_ + line1_at_), line1_len_),
                    std::string(reinterpret_cast<const char*>(p_ + arg_at_), arg_len_));
        push(deeper(pop_mark()));
        break;
      case 't': case 'l': case 'd': case 0x91: case 'o':  // TUPLE, LIST, DICT...
        push(deeper(pop_mark()));
        break;
      case 0x85:
        push(deeper(pop(1)));
        break;
      case 0x86:
        push(deeper(pop(2)));
        break;
      case 0x87:
        push(deeper(pop(3)));
        break;
      case 'g': case 'h': case 'j':  // GET, BINGET, LONG_BINGET
        memo_get(value);
        break;
      case 'p': case 'q': case 'r':  // PUT, BINPUT, LONG_BINPUT
        memo_put(value);
        break;
      case 0x94:  // MEMOIZE stores at the memo's current length
        memo_put(memo_len_);
        break;
      default:  // PROTO, FRAME: no stack effect
        break;
    }
  }

  const std::uint8_t* p_;
  std::size_t n_;
  PickleScanOptions options_;
  std::size_t pos_ = 0;
  std::size_t op_at_ = 0;
  std::uint8_t op_ = 0;
  std::vector<Item> stack_;              // each item's nesting depth (and text)
  std::vector<std::size_t> marks_;       // stack positions of the open MARKs
  std::vector<Item> memo_;               // depth + 1 of each stored item; 0: never stored
  std::unordered_map<std::uint64_t, Item> sparse_memo_;  // indices not below the pickle's size
  std::vector<std::string> texts_;       // strings pushed (collect_globals only)
  std::set<std::pair<std::string, std::string>> seen_globals_;
  std::size_t arg_at_ = 0;               // the last argument's payload: offset and length
  std::size_t arg_len_ = 0;
  std::size_t line1_at_ = 0;             // GLOBAL/INST: the module line
  std::size_t line1_len_ = 0;
  std::size_t memo_len_ = 0;             // distinct indices stored (where MEMOIZE stores)
  PickleScan result_;
};

}  // namespace

const char* pickle_opcode_name(std::uint8_t op) {
  const char* name = kOps.ops[op].name;
  return name ? name : "";
}

PickleScan scan_pickle(const void* data, std::size_t size, const PickleScanOptions& options) {
  if (data == nullptr && size != 0) throw InvalidArgument("scan_pickle: null data");
  return Scanner(static_cast<const std::uint8_t*>(data), size, options).run();
}

}  // namespace ckptio
