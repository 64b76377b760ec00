#include "mpitrain/data/dataset.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <numeric>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hdf5.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::data {
namespace {

using runtime::Error;
using runtime::ExitCode;

// An unchunked dataset is read in units of about this size when block_bytes is 0.
constexpr std::int64_t kContiguousUnitBytes = std::int64_t{1} << 20;

// Division of a row number by a count fixed when a shard is opened, as one multiplication:
// with m = floor((2^64 - 1) / d), n * m / 2^64 lies in (n / d - 1, n / d], so the estimate is
// the quotient or one less, and one comparison tells which. The 64-bit division it replaces,
// once per sample and column, took about half of expect()'s time and a fifth of prepare()'s.
class Divider {
  __extension__ using Wide = unsigned __int128;  // GCC's and Clang's, for the high half of a product

 public:
  Divider() = default;
  explicit Divider(std::int64_t d) : d_(static_cast<std::uint64_t>(d)), m_(~std::uint64_t{0} / d_) {}
  // n / d for n >= 0.
  std::int64_t operator()(std::int64_t n) const {
    const auto u = static_cast<std::uint64_t>(n);
    auto q = static_cast<std::uint64_t>((static_cast<Wide>(u) * m_) >> 64);
    q += u - q * d_ >= d_ ? 1 : 0;
    return static_cast<std::int64_t>(q);
  }

 private:
  std::uint64_t d_ = 1, m_ = ~std::uint64_t{0};
};

// One HDF5 dataset of one shard.
struct Column {
  std::string where;  // "file 'a.h5', dataset 'inputs'" for messages
  h5::Handle dataset;
  h5::Element stored = h5::Element::u8;
  h5::Element cached = h5::Element::u8;  // element type of the rows kept in the cache
  std::int64_t rows = 0;
  std::vector<std::int64_t> row_shape;
  std::int64_t row_elements = 1;
  std::int64_t unit_rows = 1;  // rows per cache entry: a whole number of HDF5 chunks
  Divider unit_of;             // a row's unit: row / unit_rows
  std::int64_t chunk_rows = 1;  // rows per HDF5 chunk (per unit when not chunked)
  std::int64_t row_bytes = 1;   // of a cached row: row_elements x the size of `cached`
  // Per unit, found on its first read: where its rows lie in the mapped file, or -1 when they
  // are read through HDF5 (asking HDF5 each epoch cost ~5 % of a loader's CPU).
  std::vector<std::int64_t> addresses;
};

struct Shard {
  std::string path;
  h5::Handle file;
  // The file as read-only memory, for rows stored exactly as they are read (see fetch); null
  // when it could not be mapped.
  std::shared_ptr<char> mapping;
  std::int64_t mapped_bytes = 0;
  std::vector<Column> columns;  // classification: inputs, targets; tokens: tokens
  std::int64_t first = 0;       // global index of its first sample
  std::int64_t samples = 0;
  std::int64_t block = 1;       // samples per block
};

struct ChunkKey {
  std::int64_t shard, column, chunk;
};

// Decompressed rows of one unit.
struct Chunk {
  std::shared_ptr<char[]> buffer;
  std::int64_t bytes = 0;
};

// Where one sample's rows of one column lie: from row `offset` of unit `unit` (its dense
// number) on, running into the column's next units (numbered consecutively) when they do not fit.
struct Span {
  const Column* column;
  std::int64_t unit, offset, count;
};

// Unit buffers are recycled: once the cache is full, a read reuses an evicted buffer instead
// of fresh memory, whose first touch costs a page fault every 4 KiB.
// Buffers go back from whichever thread lets go of a batch's blocks last, hence the lock.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  std::shared_ptr<char[]> get(std::int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& free = free_[bytes];
    char* buffer = nullptr;
    if (free.empty()) {
      buffer = new char[static_cast<std::size_t>(bytes)];
    } else {
      buffer = free.back().release();
      free.pop_back();
    }
    return std::shared_ptr<char[]>(buffer, [pool = weak_from_this(), bytes](char* b) {
      if (const auto alive = pool.lock()) alive->put(b, bytes);
      else delete[] b;
    });
  }

 private:
  void put(char* buffer, std::int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_[bytes].emplace_back(buffer);
  }

  std::mutex mutex_;
  std::map<std::int64_t, std::vector<std::unique_ptr<char[]>>> free_;
};

template <class T>
void widen_to_int64(const char* source, std::int64_t* out, std::int64_t n) {
  T value;
  for (std::int64_t i = 0; i < n; ++i) {
    std::memcpy(&value, source + i * static_cast<std::int64_t>(sizeof(T)), sizeof(T));
    out[i] = static_cast<std::int64_t>(value);
  }
}

void to_int64(h5::Element e, const char* source, std::int64_t* out, std::int64_t n) {
  switch (e) {
    case h5::Element::i8: return widen_to_int64<std::int8_t>(source, out, n);
    case h5::Element::u8: return widen_to_int64<std::uint8_t>(source, out, n);
    case h5::Element::i16: return widen_to_int64<std::int16_t>(source, out, n);
    case h5::Element::u16: return widen_to_int64<std::uint16_t>(source, out, n);
    case h5::Element::i32: return widen_to_int64<std::int32_t>(source, out, n);
    case h5::Element::u32: return widen_to_int64<std::uint32_t>(source, out, n);
    case h5::Element::i64: return widen_to_int64<std::int64_t>(source, out, n);
    default: break;
  }
  throw Error(std::string("internal: cannot widen ") + h5::element_name(e) + " to int64");
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace

// A batch's read (see Dataset::Reading): its samples' spans, and the distinct units they use.
struct Dataset::Reading::State {
  struct Unit {
    ChunkKey key;
    std::int64_t id = 0;
    Chunk chunk;            // set by acquire(), released by fill()
  };
  Fields fields;
  std::int64_t samples = 0;  // in the batch, read or not: acquire() moves the announcement on by them
  std::vector<std::pair<std::int64_t, std::int64_t>> located;  // per sample: shard, index in it
  std::vector<Span> spans;
  std::vector<Unit> units;             // in the order of first use
  std::vector<std::int32_t> slot_of;  // by unit id: its place in units, -1 if unused (array, not hash)
  std::vector<const char*> first_rows;  // fill()'s, per span (kept for its memory)
  bool acquired = false;

  void reset(std::int64_t unit_count) {
    if (slot_of.size() != static_cast<std::size_t>(unit_count)) slot_of.assign(static_cast<std::size_t>(unit_count), -1);
    for (const Unit& u : units) slot_of[static_cast<std::size_t>(u.id)] = -1;
    units.clear();
    acquired = false;
  }
  const char* data(std::int64_t id) const {
    return units[static_cast<std::size_t>(slot_of[static_cast<std::size_t>(id)])].chunk.buffer.get();
  }
};

Dataset::Reading::Reading() : state_(std::make_unique<State>()) {}
Dataset::Reading::~Reading() = default;
Dataset::Reading::Reading(Reading&&) noexcept = default;
Dataset::Reading& Dataset::Reading::operator=(Reading&&) noexcept = default;

struct Dataset::Impl {
  DatasetSpec spec;
  std::vector<std::string> files;
  std::vector<Shard> shards;
  std::vector<std::int64_t> firsts;  // shards[i].first, for the binary search
  std::vector<std::int64_t> blocks;
  std::int64_t samples = 0;
  Field inputs, targets;

  // The cache, by unit id (unit_base + chunk): the rows of a cached unit and its place in
  // `lru`, most recently used first. The ids are dense, so an array: a hash map's lookups cost
  // ~1.5 % of a loader pass.
  struct Cached {
    Chunk chunk;
    std::list<std::int64_t>::iterator place;
    bool held = false;
  };
  std::shared_ptr<BufferPool> buffers = std::make_shared<BufferPool>();
  std::vector<Cached> cache;
  std::list<std::int64_t> lru;  // unit ids
  std::int64_t cache_bytes = 0;
  std::int64_t cache_capacity = 0;
  // expect(): per unit (numbered densely, unit_base + chunk), the place among the announced
  // samples of the last one that uses it, or -1 once none still will; acquire() moves
  // `position` on by each batch's samples. One store per sample and unit, in an array: counting
  // the uses instead chained increments of the same counter, and a hash lookup costs more.
  std::vector<std::int64_t> last_use;  // empty: nothing announced
  std::int64_t position = 0;
  std::vector<std::vector<std::int64_t>> unit_base;  // per shard, per column
  std::int64_t units = 0;
  // Guards the cache and the announcement: acquire() and expect() run one at a time.
  std::mutex mutex;
  Reading own;  // read_into()'s
  std::atomic<std::int64_t> bytes_read{0}, chunks_read{0}, cache_hits{0};

  bool tokens() const { return spec.kind == Kind::tokens; }

  Column open_column(const Shard& shard, const std::string& name) {
    Column c;
    c.where = h5::place(shard.path, name);
    c.dataset = h5::open_dataset(shard.file, shard.path, name);
    const std::vector<std::int64_t> dims = h5::dims(c.dataset, c.where);
    if (dims.empty())
      throw Error(c.where + " is a scalar: its first dimension must be the sample index", ExitCode::bad_input);
    c.rows = dims[0];
    c.row_shape.assign(dims.begin() + 1, dims.end());
    c.row_elements = std::accumulate(c.row_shape.begin(), c.row_shape.end(), std::int64_t{1}, std::multiplies<>());
    const h5::Handle type = h5::file_type(c.dataset, c.where);
    c.stored = h5::classify(type.get(), c.where);
    h5::require_filters(c.dataset, c.where);
    return c;
  }

  // Sets the cached element type and the cache unit of a column once its role is known.
  // The unit (see DatasetSpec::block_bytes): one hyperslab read per unit keeps HDF5's per-call
  // cost small next to the data, whatever the chunk size.
  void settle(Column& c, h5::Element cached) const {
    c.cached = cached;
    c.row_bytes = c.row_elements * static_cast<std::int64_t>(h5::element_bytes(cached));
    const std::vector<std::int64_t> chunk = h5::chunk_dims(c.dataset, c.where);
    const std::int64_t row_bytes = std::max<std::int64_t>(1, c.row_bytes);
    if (chunk.empty()) {
      c.unit_rows = std::max<std::int64_t>(1, (spec.block_bytes > 0 ? spec.block_bytes : kContiguousUnitBytes) / row_bytes);
      c.chunk_rows = c.unit_rows;
    } else {
      c.chunk_rows = std::max<std::int64_t>(1, chunk[0]);
      const std::int64_t chunk_bytes = c.chunk_rows * row_bytes;
      c.unit_rows = c.chunk_rows * std::max<std::int64_t>(1, (spec.block_bytes + chunk_bytes / 2) / chunk_bytes);
    }
    c.unit_of = Divider(c.unit_rows);
  }

  void open() {
    if (tokens() && spec.seq_len < 1)
      throw Error("seq_len is " + std::to_string(spec.seq_len) + ": a token dataset needs seq_len >= 1",
                  ExitCode::bad_input);
    files = resolve_files(spec.source);
    for (const auto& path : files) {
      Shard shard;
      shard.path = path;
      shard.file = h5::open_file(path, spec.file_locking);
      map_file(shard);
      if (tokens()) open_tokens(shard);
      else open_classification(shard);
      shard.first = samples;
      samples += shard.samples;
      shards.push_back(std::move(shard));
    }
    if (is_manifest(spec.source)) check_manifest();
    if (samples == 0) throw Error(no_samples(), ExitCode::bad_input);
    for (const auto& shard : shards) {
      unit_base.emplace_back();
      for (const Column& column : shard.columns) {
        unit_base.back().push_back(units);
        units += (column.rows + column.unit_rows - 1) / column.unit_rows;
      }
    }
    cache.resize(static_cast<std::size_t>(units));
    for (const auto& shard : shards) {
      firsts.push_back(shard.first);
      for (std::int64_t start = 0; start < shard.samples; start += shard.block)
        blocks.push_back(std::min(shard.block, shard.samples - start));
    }
  }

  static void map_file(Shard& shard) {
    const int fd = ::open(shard.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct stat st {};
    void* memory = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size > 0)
      memory = mmap(nullptr, static_cast<std::size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (memory == MAP_FAILED) return;
    const auto bytes = static_cast<std::size_t>(st.st_size);
    shard.mapping = std::shared_ptr<char>(static_cast<char*>(memory), [bytes](char* p) { munmap(p, bytes); });
    shard.mapped_bytes = static_cast<std::int64_t>(bytes);
  }

  void open_classification(Shard& shard) {
    Column in = open_column(shard, spec.inputs);
    Column tg = open_column(shard, spec.targets);
    if (in.rows != tg.rows)
      throw Error(h5::place(shard.path) + ": '" + spec.inputs + "' has " + std::to_string(in.rows) + " rows but '" +
                      spec.targets + "' has " + std::to_string(tg.rows) +
                      ": their first dimensions must agree (one target per sample)",
                  ExitCode::bad_input);
    settle(in, h5::widened(in.stored));
    // Integer targets stay compact in the cache and are widened to int64 when a batch is made.
    settle(tg, tg.stored);
    const Field fin{spec.inputs, h5::torch_type(in.cached), in.row_shape, h5::element_name(in.stored)};
    const Field ftg{spec.targets, h5::is_integer(tg.stored) ? c10::kLong : h5::torch_type(tg.stored), tg.row_shape,
                    h5::element_name(tg.stored)};
    agree_fields(shard, fin, ftg);
    shard.samples = in.rows;
    shard.block = in.unit_rows;
    shard.columns.push_back(std::move(in));
    shard.columns.push_back(std::move(tg));
  }

  void open_tokens(Shard& shard) {
    Column tk = open_column(shard, spec.tokens);
    if (!tk.row_shape.empty())
      throw Error(tk.where + " has shape " + shape_text(h5::dims(tk.dataset, tk.where)) +
                      ": a token stream must be 1-D",
                  ExitCode::bad_input);
    if (!h5::is_integer(tk.stored))
      throw Error(tk.where + " holds " + h5::element_name(tk.stored) + ": tokens must be integers", ExitCode::bad_input);
    settle(tk, tk.stored);
    const Field fin{spec.tokens, c10::kLong, {spec.seq_len}, h5::element_name(tk.stored)};
    agree_fields(shard, fin, fin);
    shard.samples = tk.rows > 0 ? (tk.rows - 1) / spec.seq_len : 0;
    shard.block = std::max<std::int64_t>(1, tk.unit_rows / spec.seq_len);
    shard.columns.push_back(std::move(tk));
  }

  // Every shard must deliver the same dtypes and shapes, or batches could not be stacked.
  void agree_fields(const Shard& shard, const Field& in, const Field& tg) {
    if (shards.empty()) {
      inputs = in;
      targets = tg;
      return;
    }
    for (const auto& [mine, first] : {std::pair(&in, &inputs), std::pair(&tg, &targets)}) {
      if (mine->stored != first->stored || mine->shape != first->shape)
        throw Error(h5::place(shard.path, mine->name) + " holds " + mine->stored + shape_text(mine->shape) +
                        " per sample but " + h5::place(shards.front().path, first->name) + " holds " + first->stored +
                        shape_text(first->shape) + ": every shard must store the same dtype and shape",
                    ExitCode::bad_input);
    }
  }

  void check_manifest() {
    const Manifest manifest = read_manifest(spec.source);
    const auto mismatch = [&](const std::string& what) {
      throw Error("manifest '" + spec.source + "' does not match the files: " + what +
                      ": regenerate the manifest (h5shard) or fix it",
                  ExitCode::bad_input);
    };
    for (std::size_t i = 0; i < shards.size(); ++i) {
      for (const auto& column : shards[i].columns) {
        if (column.rows != manifest.files[i].rows)
          mismatch(column.where + " has " + std::to_string(column.rows) + " rows, the manifest says " +
                   std::to_string(manifest.files[i].rows));
      }
    }
    for (const auto& d : manifest.datasets) {
      for (const Field* f : {&inputs, &targets}) {
        if (f->name != d.name) continue;
        const std::vector<std::int64_t> shape = tokens() ? std::vector<std::int64_t>{} : f->shape;
        if (f->stored != d.dtype || shape != d.shape)
          mismatch("dataset '" + d.name + "' is " + f->stored + shape_text(shape) + ", the manifest says " + d.dtype +
                   shape_text(d.shape));
      }
    }
  }

  std::string no_samples() const {
    if (tokens()) {
      std::int64_t longest = 0;
      std::string where;
      for (const auto& shard : shards) {
        if (shard.columns[0].rows >= longest) {
          longest = shard.columns[0].rows;
          where = shard.columns[0].where;
        }
      }
      return "seq_len " + std::to_string(spec.seq_len) + " needs a token stream of at least " +
             std::to_string(spec.seq_len + 1) + " tokens, but the longest one (" + where + ") has " +
             std::to_string(longest) + ": use a shorter seq_len or more text";
    }
    std::string names;
    for (const auto& shard : shards) names += (names.empty() ? "'" : ", '") + shard.path + "'";
    return "the dataset has no samples: '" + spec.inputs + "' has 0 rows in " + names +
           ": check the files were written completely";
  }

  std::int64_t block_bytes() const {
    // What the units covering one block take in the cache, at most, over all shards. A
    // classification block is exactly one unit of inputs; the rows of any other column, or a
    // token block's span, may straddle one more unit.
    std::int64_t most = 0;
    for (const auto& shard : shards) {
      std::int64_t bytes = 0;
      for (std::size_t i = 0; i < shard.columns.size(); ++i) {
        const Column& c = shard.columns[i];
        const std::int64_t rows = tokens() ? shard.block * spec.seq_len + 1 : shard.block;
        bytes += (!tokens() && i == 0 ? rows : rows + c.unit_rows) * c.row_bytes;
      }
      most = std::max(most, bytes);
    }
    return most;
  }

  // Rows [first, first + count) of column c in shard s: notes each unit they lie in as one of
  // the reading's, and writes their span. Inlined into prepare()'s loop and written in place
  // field by field: a Span returned and then copied cost a failed store-to-load forwarding per
  // sample (a stall of a dozen cycles), and an append per span a call.
  [[gnu::always_inline]] void note(Reading::State& r, Span& span, std::int64_t s, std::int64_t c, std::int64_t first,
                                   std::int64_t count) const {
    const Column& column = shards[static_cast<std::size_t>(s)].columns[static_cast<std::size_t>(c)];
    const std::int64_t k = column.unit_of(first);
    span.column = &column;
    span.unit = unit_id(ChunkKey{s, c, k});
    span.offset = first - k * column.unit_rows;
    span.count = count;
    const std::int64_t spanned =
        span.offset + count <= column.unit_rows ? 1 : (span.offset + count - 1) / column.unit_rows + 1;
    for (std::int64_t i = 0; i < spanned; ++i) {
      const std::int64_t id = span.unit + i;
      std::int32_t& slot = r.slot_of[static_cast<std::size_t>(id)];
      if (slot < 0) {
        slot = static_cast<std::int32_t>(r.units.size());
        r.units.push_back({ChunkKey{s, c, k + i}, id, {}});
      }
    }
  }

  // Reads one unit, one chunk-aligned hyperslab, into the cache.
  Chunk fetch(const ChunkKey& key, std::int64_t id) {
    Shard& shard = shards[static_cast<std::size_t>(key.shard)];
    Column& column = shard.columns[static_cast<std::size_t>(key.column)];
    const std::int64_t first = key.chunk * column.unit_rows;
    const std::int64_t count = std::min(column.rows, first + column.unit_rows) - first;
    constexpr std::int64_t unknown = -2;
    if (column.addresses.empty())
      column.addresses.assign(static_cast<std::size_t>((column.rows + column.unit_rows - 1) / column.unit_rows), unknown);
    std::int64_t& address = column.addresses[static_cast<std::size_t>(key.chunk)];
    if (address == unknown)
      address = shard.mapping ? h5::stored_address(column.dataset, column.cached, first, count, column.where) : -1;
    Chunk chunk;
    if (address >= 0 && address + count * column.row_bytes <= shard.mapped_bytes) {
      // Stored exactly as read (no filter, no conversion): the rows are copied into batches
      // straight from the file's pages, one copy instead of two.
      chunk = Chunk{std::shared_ptr<char[]>(shard.mapping, shard.mapping.get() + address), count * column.row_bytes};
    } else {
      // Every buffer of a column has the full unit size, so any can be reused for any unit.
      chunk = Chunk{buffers->get(column.unit_rows * column.row_bytes), count * column.row_bytes};
      h5::read_rows(column.dataset, column.cached, first, count, chunk.buffer.get(), column.where);
    }
    bytes_read += chunk.bytes;
    chunks_read += (count + column.chunk_rows - 1) / column.chunk_rows;
    lru.push_front(id);
    cache[static_cast<std::size_t>(id)] = Cached{chunk, lru.begin(), true};
    cache_bytes += chunk.bytes;
    return chunk;
  }

  void trim() {
    while (cache_bytes > cache_capacity && !lru.empty()) drop(lru.back());
  }

  void drop(std::int64_t id) {
    Cached& entry = cache[static_cast<std::size_t>(id)];
    if (!entry.held) return;
    cache_bytes -= entry.chunk.bytes;
    lru.erase(entry.place);
    entry = Cached{};
  }

  // The shard holding a sample.
  std::int64_t shard_of(std::int64_t index) const {
    if (index < 0 || index >= samples) out_of_range(index);
    if (firsts.size() == 1) return 0;
    return static_cast<std::int64_t>(std::upper_bound(firsts.begin(), firsts.end(), index) - firsts.begin()) - 1;
  }

  [[noreturn]] void out_of_range(std::int64_t index) const {
    throw Error("sample " + std::to_string(index) + " is out of range (the dataset has " + std::to_string(samples) + ")");
  }

  std::pair<std::int64_t, std::int64_t> locate(std::int64_t index) const {
    const std::int64_t s = shard_of(index);
    return {s, index - firsts[static_cast<std::size_t>(s)]};
  }

  // The units one sample's rows lie in: its inputs and targets rows, or its token window.
  template <typename Visit>
  void for_each_unit(std::int64_t s, std::int64_t local, Visit&& visit) const {
    const auto columns = static_cast<std::int64_t>(shards[static_cast<std::size_t>(s)].columns.size());
    for (std::int64_t c = 0; c < columns; ++c) {
      const Column& column = shards[static_cast<std::size_t>(s)].columns[static_cast<std::size_t>(c)];
      const std::int64_t first = tokens() ? local * spec.seq_len : local;
      const std::int64_t last = tokens() ? first + spec.seq_len + 1 : local + 1;
      // A classification row lies in one unit: one division per sample, not two.
      const std::int64_t k_first = column.unit_of(first);
      const std::int64_t k_last = last - 1 == first ? k_first : column.unit_of(last - 1);
      for (std::int64_t k = k_first; k <= k_last; ++k) visit(ChunkKey{s, c, k});
    }
  }

  std::int64_t unit_id(const ChunkKey& key) const {
    return unit_base[static_cast<std::size_t>(key.shard)][static_cast<std::size_t>(key.column)] + key.chunk;
  }

  void expect(c10::ArrayRef<std::int64_t> indices) {
    std::lock_guard<std::mutex> lock(mutex);
    last_use.assign(static_cast<std::size_t>(units), -1);
    position = 0;
    for (std::size_t i = 0; i < indices.size(); ++i) {
      const std::int64_t s = shard_of(indices[i]);
      for_each_unit(s, indices[i] - firsts[static_cast<std::size_t>(s)],
                    [&](const ChunkKey& key) { last_use[static_cast<std::size_t>(unit_id(key))] = static_cast<std::int64_t>(i); });
    }
    for (auto it = lru.begin(); it != lru.end();) {
      const std::int64_t id = *it++;
      if (last_use[static_cast<std::size_t>(id)] < 0) drop(id);
    }
  }

  // Whether a column is read for the fields: a token window gives both from column 0; a
  // classification's column 0 holds the inputs and column 1 the targets.
  bool wanted(std::int64_t column, Fields fields) const {
    return tokens() ? fields.inputs || fields.targets : column == 0 ? fields.inputs : fields.targets;
  }

  ReadStats footprint(const std::vector<std::int64_t>& indices, Fields fields) const {
    std::vector<char> seen(static_cast<std::size_t>(units), 0);
    ReadStats stats;
    for (const std::int64_t index : indices) {
      const auto [s, local] = locate(index);
      for_each_unit(s, local, [&](const ChunkKey& key) {
        if (!wanted(key.column, fields) || std::exchange(seen[static_cast<std::size_t>(unit_id(key))], 1)) return;
        const Column& column = shards[static_cast<std::size_t>(key.shard)].columns[static_cast<std::size_t>(key.column)];
        const std::int64_t count = std::min(column.rows, (key.chunk + 1) * column.unit_rows) - key.chunk * column.unit_rows;
        stats.bytes_read += count * column.row_bytes;
        stats.chunks_read += (count + column.chunk_rows - 1) / column.chunk_rows;
      });
    }
    return stats;
  }

  // The span one row further on: a token window's targets.
  static Span shifted(Span span) {
    if (++span.offset == span.column->unit_rows) {
      ++span.unit;
      span.offset = 0;
    }
    return span;
  }

  // Copies an acquired span's rows, as raw bytes or widened to int64.
  static void copy(const Reading::State& r, Span span, bool widen, char* out) {
    const Column& column = *span.column;
    const std::int64_t out_row_bytes = widen ? column.row_elements * 8 : column.row_bytes;
    for (; span.count > 0; ++span.unit, span.offset = 0) {
      const std::int64_t take = std::min(span.count, column.unit_rows - span.offset);
      const char* source = r.data(span.unit) + span.offset * column.row_bytes;
      if (widen) to_int64(column.cached, source, reinterpret_cast<std::int64_t*>(out), take * column.row_elements);
      else std::memcpy(out, source, static_cast<std::size_t>(take * column.row_bytes));
      out += take * out_row_bytes;
      span.count -= take;
    }
  }

  // Starts loading an acquired span's rows from `begin` (its first row) up to the end of their
  // first unit into the CPU cache, into L1 (locality 3) or only as far as L2 (1). Shuffled
  // rows defeat the hardware prefetcher: copied cold, each waits on memory.
  template <int Locality>
  static void prefetch(const char* begin, const Span& span) {
    constexpr std::uintptr_t line = 64;
    const Column& column = *span.column;
    const char* end = begin + std::min(span.count, column.unit_rows - span.offset) * column.row_bytes;
    for (auto at = reinterpret_cast<std::uintptr_t>(begin) & ~(line - 1); at < reinterpret_cast<std::uintptr_t>(end);
         at += line) {
      __builtin_prefetch(reinterpret_cast<const void*>(at), 0, Locality);
      // GCC 12 deletes a loop of prefetches alone (it counts them as no effect); the fence,
      // which emits no code, keeps it.
      std::atomic_signal_fence(std::memory_order_seq_cst);
    }
  }

  // Where each sample lives (shard, index within it), its rows (a token window, or its wanted
  // classification columns' rows) and the distinct units they use: no shared state touched.
  void prepare(c10::ArrayRef<std::int64_t> indices, const Batch& out, Reading::State& r) const {
    const auto n = static_cast<std::int64_t>(indices.size());
    const auto made = [n](const at::Tensor& t, const Field& f) {
      return !t.defined() || (t.size(0) == n && t.scalar_type() == f.dtype && t.is_contiguous());
    };
    if (!made(out.inputs, inputs) || !made(out.targets, targets))
      throw Error("Dataset::read_into: the batch was not made by allocate(" + std::to_string(n) + ")");
    r.reset(units);
    r.samples = n;
    r.fields = Fields{out.inputs.defined(), out.targets.defined()};
    // A token window is one span; a classification sample has one per field read; nothing is
    // read for no field. The vectors keep their size from batch to batch (overwritten, not
    // cleared and appended to).
    const std::size_t fields = (r.fields.inputs ? 1 : 0) + (r.fields.targets ? 1 : 0);
    const std::size_t per_sample = tokens() ? std::min<std::size_t>(fields, 1) : fields;
    r.located.resize(per_sample == 0 ? 0 : indices.size());
    r.spans.resize(indices.size() * per_sample);
    Span* span = r.spans.data();
    for (std::size_t p = 0; p < r.located.size(); ++p) {
      const std::int64_t s = shard_of(indices[p]);
      const std::int64_t local = indices[p] - firsts[static_cast<std::size_t>(s)];
      r.located[p].first = s;  // not as a pair: see note()
      r.located[p].second = local;
      if (tokens()) {
        // The window's seq_len + 1 tokens give the inputs and, one on, the targets.
        note(r, *span, s, 0, local * spec.seq_len, spec.seq_len + 1);
        span++->count = spec.seq_len;
      } else {
        if (r.fields.inputs) note(r, *span++, s, 0, local, 1);
        if (r.fields.targets) note(r, *span++, s, 1, local, 1);
      }
    }
  }

  // Per distinct unit, not per sample: whether an announced sample after this batch still
  // needs it, and its rows from the cache or the file.
  void acquire(Reading::State& r) {
    h5::quiet();
    std::lock_guard<std::mutex> lock(mutex);
    const std::int64_t end = position + r.samples;
    for (Reading::State::Unit& u : r.units) {
      const Cached& entry = cache[static_cast<std::size_t>(u.id)];
      if (entry.held) {
        ++cache_hits;
        lru.splice(lru.begin(), lru, entry.place);
        u.chunk = entry.chunk;
      } else {
        u.chunk = fetch(u.key, u.id);
      }
      // A unit no later announced sample needs leaves the cache; the reading holds its own
      // units until fill() has copied them.
      if (!last_use.empty()) {
        std::int64_t& last = last_use[static_cast<std::size_t>(u.id)];
        if (last >= 0 && last < end) {
          last = -1;
          drop(u.id);
        }
      }
    }
    trim();
    position = end;
    r.acquired = true;
  }

  void fill(Reading::State& r, Batch& out) const {
    if (!r.fields.inputs && !r.fields.targets) return;
    if (!r.acquired) throw Error("internal: Dataset::fill before acquire");
    const auto n = static_cast<std::int64_t>(r.located.size());
    const auto rows = [n](const at::Tensor& t) {
      return t.defined() ? std::pair(static_cast<char*>(t.data_ptr()),
                                     t.numel() / std::max<std::int64_t>(1, n) * static_cast<std::int64_t>(t.element_size()))
                         : std::pair<char*, std::int64_t>(nullptr, 0);
    };
    const auto [in, in_bytes] = rows(out.inputs);
    const auto [tg, tg_bytes] = rows(out.targets);
    const Fields fields = r.fields;
    const std::vector<Span>& spans = r.spans;
    // While one sample is copied, the rows of the sample 12 places on are requested into L2
    // and those of the sample 4 places on into L1: more rows in flight than the L1's miss
    // slots allow, without stalling on them. Against 4 ahead into L1 alone, the gather took
    // 1.3-1.4x less time on a 47 MB shard (docs/benchmarks.md).
    const std::size_t per_sample = tokens() || !fields.inputs || !fields.targets ? 1 : 2;
    const std::size_t near = 4 * per_sample, far = 12 * per_sample;
    // Each span's first row, found once: the loop below then reads only these and the rows.
    std::vector<const char*>& first = r.first_rows;
    first.resize(spans.size());
    for (std::size_t i = 0; i < spans.size(); ++i)
      first[i] = r.data(spans[i].unit) + spans[i].offset * spans[i].column->row_bytes;
    for (std::size_t i = 0; i < std::min(spans.size(), far); ++i) prefetch<1>(first[i], spans[i]);
    for (std::size_t i = 0; i < std::min(spans.size(), near); ++i) prefetch<3>(first[i], spans[i]);
    const bool widen_targets = targets.dtype == c10::kLong;
    for (std::size_t i = 0; i < spans.size(); ++i) {
      if (i + far < spans.size()) prefetch<1>(first[i + far], spans[i + far]);
      if (i + near < spans.size()) prefetch<3>(first[i + near], spans[i + near]);
      const auto p = static_cast<std::int64_t>(i / per_sample);
      const Column& column = *spans[i].column;
      if (tokens()) {
        if (fields.inputs) copy(r, spans[i], true, in + p * in_bytes);
        if (fields.targets) copy(r, shifted(spans[i]), true, tg + p * tg_bytes);
      } else if (fields.inputs && i % per_sample == 0) {
        // A classification sample's row, in one unit.
        std::memcpy(in + p * in_bytes, first[i], static_cast<std::size_t>(column.row_bytes));
      } else if (widen_targets) {
        to_int64(column.cached, first[i], reinterpret_cast<std::int64_t*>(tg + p * tg_bytes), column.row_elements);
      } else {
        std::memcpy(tg + p * tg_bytes, first[i], static_cast<std::size_t>(column.row_bytes));
      }
    }
    // Copied: the units go back (a buffer the cache dropped meanwhile to the pool).
    for (Reading::State::Unit& u : r.units) u.chunk = Chunk{};
    r.acquired = false;
    if (spec.id_limit > 0) {
      if (tokens() && fields.inputs) check_ids(out.inputs, r.located, "token");
      if (fields.targets) check_ids(out.targets, r.located, tokens() ? "token" : "target");
    }
  }

  // Ids the model cannot take (a damaged shard, or data made for another model) fail here,
  // naming the file and sample, rather than deep inside an embedding or the loss.
  void check_ids(const at::Tensor& ids, const std::vector<std::pair<std::int64_t, std::int64_t>>& located,
                 const char* what) const {
    std::int64_t first_bad = -1;  // element index
    if (ids.scalar_type() == at::kLong) {
      // A plain scan: the ATen ops of the general case cost several microseconds per batch on
      // the reader thread, more than the check itself.
      const std::int64_t* id = ids.data_ptr<std::int64_t>();
      for (std::int64_t i = 0, n = ids.numel(); i < n && first_bad < 0; ++i)
        if (id[i] < 0 || id[i] >= spec.id_limit) first_bad = i;
    } else {
      const at::Tensor bad = ids.lt(0).logical_or_(ids.ge(spec.id_limit)).flatten();
      if (bad.any().item<bool>()) first_bad = bad.nonzero()[0][0].item<std::int64_t>();
    }
    if (first_bad < 0) return;
    const std::int64_t row = first_bad / std::max<std::int64_t>(1, ids.numel() / ids.size(0));
    const auto [s, local] = located[static_cast<std::size_t>(row)];
    const std::int64_t value = ids.flatten()[first_bad].item<std::int64_t>();
    throw Error(h5::place(shards[static_cast<std::size_t>(s)].path) + ": sample " + std::to_string(local) + " holds " +
                    what + " id " + std::to_string(value) + ", outside [0, " + std::to_string(spec.id_limit) +
                    ") of the model: the shard is damaged or was made for another model (check it with h5shard "
                    "verify, or the model's vocab_size / num_classes)",
                ExitCode::bad_input);
  }
};

Dataset::Dataset(const DatasetSpec& spec, std::int64_t cache_blocks) : impl_(std::make_unique<Impl>()) {
  h5::quiet();
  impl_->spec = spec;
  impl_->open();
  // More than every block is every block (and keeps the product from overflowing).
  const auto all = static_cast<std::int64_t>(impl_->blocks.size());
  impl_->cache_capacity = std::clamp<std::int64_t>(cache_blocks, 1, all) * impl_->block_bytes();
}

Dataset::~Dataset() = default;

const DatasetSpec& Dataset::spec() const { return impl_->spec; }
const std::vector<std::string>& Dataset::files() const { return impl_->files; }
std::int64_t Dataset::size() const { return impl_->samples; }
const Field& Dataset::inputs() const { return impl_->inputs; }
const Field& Dataset::targets() const { return impl_->targets; }
const std::vector<std::int64_t>& Dataset::blocks() const { return impl_->blocks; }

std::int64_t Dataset::bytes() const {
  std::int64_t total = 0;
  for (const auto& shard : impl_->shards)
    for (const auto& column : shard.columns) total += column.rows * column.row_bytes;
  return total;
}

std::int64_t Dataset::block_bytes() const { return impl_->block_bytes(); }
void Dataset::set_cache_bytes(std::int64_t bytes) { impl_->cache_capacity = std::max<std::int64_t>(bytes, 1); }
std::int64_t Dataset::cache_bytes() const { return impl_->cache_capacity; }
void Dataset::expect(c10::ArrayRef<std::int64_t> indices) { impl_->expect(indices); }
ReadStats Dataset::stats() const { return {impl_->bytes_read, impl_->chunks_read, impl_->cache_hits}; }
ReadStats Dataset::footprint(const std::vector<std::int64_t>& indices, Fields fields) const {
  return impl_->footprint(indices, fields);
}

std::string Dataset::description() const {
  std::string out = std::string(to_string(impl_->spec.kind)) + " samples=" + std::to_string(impl_->samples);
  if (impl_->tokens()) out += " seq_len=" + std::to_string(impl_->spec.seq_len);
  for (const Field* f : {&impl_->inputs, &impl_->targets})
    out += " " + f->name + "=" + f->stored + shape_text(f->shape) + "->" + c10::toString(f->dtype);
  out += " shards=";
  for (const auto& shard : impl_->shards)
    out += std::to_string(shard.samples) + "/" + std::to_string(shard.block) + ";";
  return out;
}

Batch Dataset::allocate(std::int64_t n, bool pinned, Fields fields) const {
  const auto shape = [n](const Field& f) {
    std::vector<std::int64_t> s{n};
    s.insert(s.end(), f.shape.begin(), f.shape.end());
    return s;
  };
  Batch batch;
  if (fields.inputs)
    batch.inputs = at::empty(shape(impl_->inputs), at::TensorOptions().dtype(impl_->inputs.dtype).pinned_memory(pinned));
  if (fields.targets)
    batch.targets = at::empty(shape(impl_->targets), at::TensorOptions().dtype(impl_->targets.dtype).pinned_memory(pinned));
  return batch;
}

void Dataset::read_into(c10::ArrayRef<std::int64_t> indices, Batch& out) {
  prepare(indices, out, impl_->own);
  acquire(impl_->own);
  fill(impl_->own, out);
}

void Dataset::prepare(c10::ArrayRef<std::int64_t> indices, const Batch& out, Reading& reading) const {
  impl_->prepare(indices, out, *reading.state_);
}

void Dataset::acquire(Reading& reading) { impl_->acquire(*reading.state_); }

void Dataset::fill(Reading& reading, Batch& out) const { impl_->fill(*reading.state_, out); }

Batch Dataset::read(const std::vector<std::int64_t>& indices) {
  Batch batch = allocate(static_cast<std::int64_t>(indices.size()));
  read_into(indices, batch);
  return batch;
}

}  // namespace mpitrain::data
