#include <cstring>
#include <string>
#include <vector>

#include "ckptio/errors.hpp"
#include "ckptio/pickle_scan.hpp"
#include "harness.hpp"

using ckptio::PickleScan;
using ckptio::PickleScanOptions;
using Bytes = std::string;
using namespace std::string_literals;

namespace {

PickleScanOptions full() {
  PickleScanOptions o;
  o.weights_only = false;
  return o;
}

PickleScan scan(const Bytes& b, const PickleScanOptions& o = {}) {
  return ckptio::scan_pickle(b.data(), b.size(), o);
}

// The FormatError message scanning `b` raises, or "" when it passes.
std::string error_of(const Bytes& b, const PickleScanOptions& o = {}) {
  try {
    scan(b, o);
  } catch (const ckptio::FormatError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

Bytes le(std::uint64_t v, int n) {
  Bytes out;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return out;
}

Bytes binunicode(const std::string& s) { return "X" + le(s.size(), 4) + s; }

// {'a': 1, 'b': [1, 1]} as protocol 2 writes it, with memo stores and a GET.
Bytes small_dict() {
  Bytes b = "\x80\x02}q\x00("s;
  b += binunicode("a") + "q\x01K\x01";
  b += binunicode("b") + "q\x02]q\x03(K\x01h\x01" "e";
  b += "u.";
  return b;
}

}  // namespace

TEST(pickle_scan_accepts_protocol_2_dict) {
  const Bytes b = small_dict();
  const PickleScan s = scan(b);
  CHECK(s.complete);
  CHECK_EQ(s.end, b.size());
  CHECK_EQ(s.memo_puts, 4u);
  CHECK_EQ(s.max_depth, 2u);
  // Trailing bytes after STOP are not read, as the unpickler does not read them.
  CHECK(scan(b + "garbage").complete);
}

TEST(pickle_scan_accepts_any_memo_index_and_reports_the_largest) {
  // CPython accepts any index a pickle stores, however far past the pickle's size: the scan
  // refuses none and reports memo_size, from which the caller picks a dict-memo unpickler.
  const Bytes b4096 = "\x80\x02}r" + le(4096, 4) + ".";
  CHECK(scan(b4096).complete);
  CHECK_EQ(scan(b4096).memo_size, 4097u);
  const Bytes bomb = "\x80\x02}r" + le(0x7fffffff, 4) + ".";
  const PickleScan s = scan(bomb);
  CHECK(s.complete);
  CHECK_EQ(s.memo_puts, 1u);
  CHECK_EQ(s.memo_size, 0x80000000u);
  CHECK(scan(bomb, full()).complete);
  // A GET of the far index finds it (the scan's map), a GET of a neighbour does not.
  CHECK(scan("\x80\x02}r" + le(0x7fffffff, 4) + "j" + le(0x7fffffff, 4) + "\x86.").complete);
  CHECK(contains(error_of("\x80\x02}r" + le(0x7fffffff, 4) + "j" + le(0x7ffffffe, 4) + "."),
                 "memo index 2147483646 was never stored"));
  // Text PUT (protocol 0) in a full load, up to a Py_ssize_t; MEMOIZE counts far stores.
  const PickleScan text = scan("(lp99999999999\n.", full());
  CHECK_EQ(text.memo_size, 100000000000u);
  CHECK(scan("(lp9223372036854775807\n.", full()).complete);
  CHECK(scan("\x80\x04]r" + le(0x7fffffff, 4) + "]\x94h\x01\x86.", full()).complete);
}

TEST(pickle_scan_accepts_sparse_memo_indices) {
  // Older picklers (Python 2's cPickle) number memo stores from 1; optimizers leave gaps;
  // CPython accepts any index, in any order. One store at index 20 of a 37-byte pickle:
  const Bytes gap = "\x80\x02]q\x14" + Bytes(30, ']') + ".";
  const PickleScan s = scan(gap);
  CHECK(s.complete);
  CHECK_EQ(s.memo_puts, 1u);
  CHECK_EQ(s.memo_size, 21u);
  // From 1, with a GET of each; out of order; LONG_BINPUT with a gap; stored twice.
  CHECK(scan("\x80\x02]q\x01]q\x02h\x01h\x02\x86."s).complete);
  CHECK(scan("\x80\x02]q\x05]q\x02h\x05h\x02\x86."s).complete);
  CHECK(scan("\x80\x02(]r" + le(300, 4) + "j" + le(300, 4) + Bytes(300, 'N') + "t.").complete);
  CHECK(scan("\x80\x02]q\x00]q\x01]q\x00."s).complete);
  // Text PUT/GET parse as CPython's int(line): blanks, sign, leading zeros, '_'.
  CHECK(scan("((lp 0_0_1 \ng+1\n0g0001\nt.", full()).complete);
  CHECK(scan("((lp00000000000000000000000002\ng2\nt.", full()).complete);
  CHECK(contains(error_of("(lp-1\n.", full()), "negative memo index"));
  CHECK(contains(error_of("(lp1__0\n.", full()), "malformed memo index"));
  CHECK(contains(error_of("(lp0x1\n.", full()), "malformed memo index"));
  CHECK(contains(error_of("(lp99999999999999999999\n.", full()), "does not fit a Py_ssize_t"));
}

TEST(pickle_scan_refuses_get_of_unstored_index) {
  CHECK(contains(error_of("\x80\x02]q\x00h\x01."s), "memo index 1 was never stored"));
  CHECK(contains(error_of("\x80\x02j" + le(0xffffffff, 4) + "."), "LONG_BINGET at offset 2"));
}

TEST(pickle_scan_refuses_lengths_past_the_end) {
  CHECK(contains(error_of("\x80\x02X" + le(0xfffffff0u, 4) + "abc."), "runs past the end"));
  CHECK(contains(error_of("\x80\x02X\x01\x00"s), "BINUNICODE at offset 2"));
  CHECK(contains(error_of("\x80\x05\x8e" + le(1ull << 62, 8) + ".", full()),
                 "BINBYTES8 at offset 2"));
  CHECK(contains(error_of("\x80\x05\x95" + le(1ull << 40, 8) + "N.", full()), "a frame of"));
  CHECK(contains(error_of("\x80\x02T" + le(0x80000000u, 4) + ".", full()), "negative length"));
  CHECK(contains(error_of("\x80\x02J\x01\x02"), "the argument of 4 bytes"));
  CHECK(contains(error_of("\x80\x02" "cos\nsys"), "has no end"));
}

TEST(pickle_scan_refuses_truncation) {
  const Bytes b = small_dict();
  for (std::size_t cut = 0; cut < b.size(); ++cut) {
    CHECK(!error_of(b.substr(0, cut)).empty());
  }
  CHECK(contains(error_of("\x80\x02N"), "without a STOP"));
  CHECK(contains(error_of(""), "without a STOP"));
}

TEST(pickle_scan_accepts_any_nesting) {
  // CPython's unpickler is iterative: 100,000 nested tuples (or lists, or open MARKs) load, so
  // the scan refuses no depth; it reports the deepest.
  CHECK_EQ(scan("\x80\x02)" + Bytes(99999, '\x85') + ".").max_depth, 100000u);
  // Lists nested by APPEND: the depth flows into the list that receives the child.
  CHECK_EQ(scan("\x80\x02" + Bytes(1200, ']') + Bytes(1199, 'a') + ".").max_depth, 1200u);
  CHECK_EQ(scan("\x80\x02" + Bytes(100000, '(') + "N.").max_depth, 100000u);
}

TEST(pickle_scan_weights_only_opcodes_match_torch) {
  // What torch's weights-only unpickler refuses (FRAME, BINBYTES, INST, EXT1, STACK_GLOBAL...).
  const char* refused[] = {"\x95", "B", "i", "\x82", "\x93", "\x94", "\x8c", "P", "0", "2"};
  for (const char* op : refused) {
    const std::string e = error_of("\x80\x02" + Bytes(op, 1) + ".");
    CHECK(contains(e, "not supported by torch's weights-only unpickler"));
    CHECK(contains(e, "at offset 2"));
  }
  CHECK(contains(error_of("\x80\x02\xff."), "unknown opcode 0xff"));
  // A full load leaves unknown opcodes to the unpickler, which fails there.
  const PickleScan lenient = scan("\x80\x02\xff" + Bytes(10, 'X'), full());
  CHECK(!lenient.complete);
  CHECK_EQ(lenient.end, 0u);
}

TEST(pickle_scan_full_mode_reads_every_protocol) {
  // Protocol 4: FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, EMPTY_SET/ADDITEMS, GET text.
  Bytes b = "\x8c\x01m\x94\x8c\x01n\x94\x93\x94";
  b += "\x8f(K\x01K\x02\x90";                          // {1, 2}
  b += "h\x00"s "0" "(" "0" "2" "0";                    // GET, POP, MARK popped by POP, DUP
  b += ".";
  b = "\x80\x04\x95" + le(b.size(), 8) + b;  // one frame holding every other opcode
  const PickleScan s = scan(b, full());
  CHECK(s.complete);
  CHECK_EQ(s.memo_puts, 3u);
  CHECK(contains(error_of(b), "FRAME"));  // not in weights-only mode
}

TEST(pickle_scan_refuses_stack_underflow) {
  CHECK(contains(error_of("\x80\x02R."), "stack underflow"));
  CHECK(contains(error_of("\x80\x02."), "stack underflow"));
  CHECK(contains(error_of("\x80\x02t."), "no MARK"));
  CHECK(contains(error_of("\x80\x02N(q\x00."s), "BINPUT at offset 4"));
}

TEST(pickle_scan_is_linear) {
  // A 20,000-entry dict of memoized tuples scans quickly and within its size.
  Bytes b = "\x80\x02}q\x00("s;
  std::uint32_t memo = 1;
  for (int i = 0; i < 20000; ++i) {
    b += binunicode("layer." + std::to_string(i)) + "r" + le(memo++, 4);
    b += "K\x01K\x02\x86r" + le(memo++, 4);
  }
  b += "u.";
  const PickleScan s = scan(b);
  CHECK_EQ(s.memo_puts, 40001u);
  CHECK_EQ(s.opcodes, 4u + 20000u * 6u + 2u);
}

TEST(pickle_scan_collects_globals) {
  PickleScanOptions o = full();
  o.collect_globals = true;
  // GLOBAL twice (listed once), STACK_GLOBAL from pushed strings and from memo GETs, INST.
  Bytes b = "\x80\x04" "cargparse\nNamespace\n)R0cargparse\nNamespace\n0"s;
  b += "\x8c\x05numpy\x94\x8c\x06scalar\x94\x93\x94" "0";
  b += "h\x00h\x01\x93" "0"s;
  b += "\x8c\x03mod\x8c\x04Name\x93" "0";
  b += "(ibuiltins\nobject\n.";
  const PickleScan s = scan(b, o);
  CHECK(s.complete);
  CHECK_EQ(s.globals.size(), 4u);
  CHECK(s.globals[0] == std::make_pair("argparse"s, "Namespace"s));
  CHECK(s.globals[1] == std::make_pair("numpy"s, "scalar"s));
  CHECK(s.globals[2] == std::make_pair("mod"s, "Name"s));
  CHECK(s.globals[3] == std::make_pair("builtins"s, "object"s));
  // Off by default: no strings kept.
  CHECK(scan(b, full()).globals.empty());
}
