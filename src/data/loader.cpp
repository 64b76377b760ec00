#include "mpitrain/data/loader.h"

#include <ATen/ATen.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <thread>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "mpitrain/comm/agreement.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fatal.h"
#include "mpitrain/runtime/memory_budget.h"

namespace mpitrain::data {
namespace {

using runtime::Error;
using runtime::ExitCode;

// A batch read ahead, or the error that stopped the reading.
struct Ready {
  Batch batch;
  std::exception_ptr error;
#ifdef MPITRAIN_HAVE_NCCL
  std::unique_ptr<at::cuda::CUDAEvent> copied;  // recorded on the copy stream after the copy
#endif
};

// A spin-wait hint: lets the other hardware thread of the core run, and saves power.
inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

void check_shares(const std::vector<std::int64_t>& shares, int world) {
  bool ok = shares.size() == static_cast<std::size_t>(world);
  for (std::int64_t share : shares) ok = ok && share >= 1;
  if (!ok)
    throw Error("data loader: the shares of a global batch must be one count >= 1 per rank (" + std::to_string(world) +
                    " ranks, " + std::to_string(shares.size()) + " shares given)",
                ExitCode::bad_input);
}

}  // namespace

struct Loader::Impl {
  LoaderOptions options;
  int rank = 0;
  int world = 1;
  std::unique_ptr<Dataset> dataset;
  std::unique_ptr<Sampler> sampler;
  LoaderState position;  // what the consumer has been handed
  double starved = 0;     // seconds next() waited on an empty queue (the consumer's alone)

  // One epoch's samples of this rank, computed once by the first worker that needs them.
  struct EpochOrder {
    std::int64_t epoch = 0;
    std::once_flag once;
    std::vector<std::int64_t> mine;
  };
  // A micro-batch a worker has claimed: its place in the read order and in the epoch.
  struct Job {
    std::int64_t seq = 0;  // claimed since start(): delivery and acquire() go in this order
    std::int64_t epoch = 0, step = 0, micro = 0;
    std::shared_ptr<EpochOrder> order;
    bool announce = false;  // the first job of start() or of an epoch: expect() its samples
    Batch batch;            // recycled memory, or undefined (the worker allocates)
  };

  std::mutex mutex;  // guards everything below it
  std::condition_variable changed;  // for next(): the queue grew, or holds an error
  std::condition_variable space;    // for the workers: claiming may go on, or stop
  std::condition_variable turn;     // for the workers: `acquired` moved on, or stop
  std::deque<Ready> queue;          // batches in order, for next()
  std::map<std::int64_t, Ready> done;  // read out of order, waiting for the ones before
  bool stop = false;
  bool failed = false;  // a worker's read failed: claim nothing more
  bool full = false;    // `prefetch` batches claimed and not taken: wait for half of them
  std::int64_t claimed = 0, delivered = 0, handed = 0;  // batches since start()
  std::atomic<std::int64_t> acquired{0};  // batches past acquire() since start(), written under mutex
  LoaderState cursor;  // the next micro-batch to claim
  std::shared_ptr<EpochOrder> order;  // cursor.epoch's
  // The dataset's counters when the reader began each epoch (guarded by mutex), for stats(epoch).
  std::map<std::int64_t, ReadStats> epoch_start;
  std::vector<std::thread> workers;
  // CPU batches handed out before, reused once the consumer has let go of them: fresh memory
  // would cost a page fault every 4 KiB of every batch.
  std::deque<Batch> recycled;
#ifdef MPITRAIN_HAVE_NCCL
  std::optional<c10::cuda::CUDAStream> copy_stream;
#endif

  // One all-gather of a fixed-size summary; every rank reaches the same verdict.
  void agree(comm::Communicator& comm, const std::string& open_error) {
    std::string shares;  // every rank's, filled in by the constructor
    for (std::int64_t share : options.shares) shares += (shares.empty() ? "" : ",") + std::to_string(share);
    const std::string order = "batch=" + shares + " accumulation=" + std::to_string(options.accumulation) +
                              " world=" + std::to_string(world) + " seed=" + std::to_string(options.seed) +
                              " shuffle=" + std::to_string(options.shuffle) + " window=" +
                              std::to_string(options.shuffle_window) + " partitions=" +
                              std::to_string(options.partitions) + " remainder=" + to_string(options.remainder);
    const bool ok = open_error.empty();
    constexpr std::int64_t kFields = 4;
    const std::vector<std::int64_t> mine = {ok ? 1 : 0, ok ? dataset->size() : -1,
                                            ok ? comm::fnv1a(dataset->description()) : 0, comm::fnv1a(order)};
    const auto device_long = at::TensorOptions().dtype(at::kLong).device(comm.device());
    at::Tensor input = at::tensor(mine, at::kLong).to(comm.device());
    at::Tensor gathered = at::empty({kFields * comm.size()}, device_long);
    comm.all_gather(gathered, input);
    gathered = gathered.cpu();
    const std::int64_t* all = gathered.data_ptr<std::int64_t>();
    std::vector<int> failed, other_data, other_order;
    for (int r = 0; r < comm.size(); ++r) {
      const std::int64_t* theirs = all + r * kFields;
      if (theirs[0] == 0) failed.push_back(r);
      else if (ok && (theirs[1] != mine[1] || theirs[2] != mine[2])) other_data.push_back(r);
      if (theirs[3] != mine[3]) other_order.push_back(r);
    }
    if (!ok) throw Error(open_error, ExitCode::bad_input);
    if (!failed.empty())
      throw Error("the data loader could not open the dataset on rank(s) " + comm::list_text(failed) +
                      " (see their errors): every rank must be able to read '" + dataset->spec().source + "'",
                  ExitCode::bad_input);
    if (!other_data.empty())
      throw Error("ranks see different datasets: rank " + std::to_string(comm.rank()) + " sees " +
                      dataset->description() + ", rank(s) " + comm::list_text(other_data) +
                      " see something else: every rank must read the same shards (one shared copy, or "
                      "identical copies)",
                  ExitCode::bad_input);
    if (!other_order.empty())
      throw Error("ranks disagree on the data loader options: rank " + std::to_string(comm.rank()) + " has " + order +
                      ", rank(s) " + comm::list_text(other_order) + " differ: every rank must pass the same",
                  ExitCode::bad_input);
  }

  void start(const LoaderState& from) {
    stop = failed = full = false;
    claimed = delivered = handed = 0;
    acquired = 0;
    cursor = from;
    order.reset();
    done.clear();
    for (int w = 0; w < options.workers; ++w) {
      workers.emplace_back([this] {
        // Background work: a worker woken by next() must not preempt the training thread on
        // its core (wake-up preemption), which put the next batch into the step's data wait.
        // SCHED_BATCH keeps the worker's fair share of the CPU and gives up only that preemption.
        const sched_param background{};
        pthread_setschedparam(pthread_self(), SCHED_BATCH, &background);
        // work() hands its errors to the consumer; what escapes it (no memory left to queue
        // the error) ends the job with a message instead of std::terminate.
        try {
          work();
        } catch (const std::exception& e) {
          runtime::fatal("the data loader's reader thread failed: " + std::string(e.what()));
        } catch (...) {
          runtime::fatal("the data loader's reader thread failed with an unknown exception");
        }
      });
    }
  }

  // Nobody else holds the tensor or its memory: only `recycled` refers to it.
  static bool unused(const at::Tensor& t) {
    return !t.defined() || (t.use_count() == 1 && t.storage().use_count() == 1);
  }

  bool reads() const { return options.fields.inputs || options.fields.targets; }

  // prefetch 0: as many batches as hold 1 MiB, at least 8 and at most 64. Small batches cost
  // the same thread wake-ups as large ones: half the read-ahead (what a starved next() waits
  // for) should be enough reading to be worth a wake (~0.5 MiB, 100 us or more), while all of
  // it stays within a core's L2 cache, so the step finds its batch still cached.
  int auto_prefetch() const {
    constexpr std::int64_t target = 1 << 20, fewest = 8, most = 64;
    // One sample as next() delivers it: the fields wanted, in their delivered dtypes.
    const Batch one = dataset->allocate(1, /*pinned=*/false, options.fields);
    std::int64_t sample = 0;
    for (const at::Tensor* t : {&one.inputs, &one.targets})
      if (t->defined()) sample += static_cast<std::int64_t>(t->nbytes());
    const std::int64_t batch = std::max<std::int64_t>(1, options.batch_size * sample);
    return static_cast<int>(std::clamp(target / batch, fewest, most));
  }

  // The batches claimed and not taken at which full workers start reading again.
  std::size_t refill_at() const { return static_cast<std::size_t>(options.prefetch / 2); }
  // The queue length at which a next() that found the queue empty goes on.
  std::size_t ready_at() const { return static_cast<std::size_t>(std::max(1, options.prefetch / 2)); }

  // A batch the consumer let go of (under mutex), or undefined tensors.
  Batch take_recycled() {
    for (auto it = recycled.begin(); it != recycled.end(); ++it) {
      const at::Tensor& any = it->inputs.defined() ? it->inputs : it->targets;
      if (unused(it->inputs) && unused(it->targets) && any.size(0) == options.batch_size) {
        Batch batch = std::move(*it);
        recycled.erase(it);
        return batch;
      }
    }
    return {};
  }

  void remember(const Batch& batch) {
    recycled.push_back(batch);
    if (recycled.size() > static_cast<std::size_t>(options.prefetch + options.workers) + 4) recycled.pop_front();
  }

  void halt() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    space.notify_all();
    turn.notify_all();
    for (std::thread& worker : workers) worker.join();
    workers.clear();
    queue.clear();
    done.clear();
  }

  // The cache holds, for every partition this rank's slices touch, a shuffle window of blocks
  // and the next one (data.cache_mb overrides; window 0 caches all).
  void size_cache() {
    if (options.cache_bytes > 0) return dataset->set_cache_bytes(options.cache_bytes);
    if (options.shuffle_window == 0) return dataset->set_cache_bytes(std::numeric_limits<std::int64_t>::max());
    const auto [first, last] =
        sampler->partitions_of(slice_begin(0), slice_begin(options.accumulation - 1) + options.batch_size);
    const std::int64_t touched = last - first + 1;
    const std::int64_t blocks = std::min<std::int64_t>(touched * (2 * options.shuffle_window + 2),
                                                       static_cast<std::int64_t>(dataset->blocks().size()));
    dataset->set_cache_bytes(blocks * dataset->block_bytes());
  }

  void begin_epoch(std::int64_t epoch) {
    const ReadStats now = dataset->stats();
    std::lock_guard<std::mutex> lock(mutex);
    epoch_start[epoch] = now;
  }

  // Where this rank's micro-batch `micro` lies in a global batch: [begin, begin + share).
  std::int64_t slice_begin(std::int64_t micro) const {
    const std::int64_t before = std::accumulate(options.shares.begin(), options.shares.begin() + rank, std::int64_t{0});
    return options.accumulation * before + micro * options.batch_size;
  }

  // This rank's samples of an epoch, its slice of every global batch one after the other (the
  // sampler computes only the partitions the slices touch).
  std::vector<std::int64_t> my_order(std::int64_t epoch) const {
    const std::int64_t begin = slice_begin(0);
    return sampler->order(epoch, begin, begin + options.accumulation * options.batch_size);
  }

  // The next micro-batch in read order (under mutex): once `prefetch` are claimed and not
  // taken, claiming sleeps until next() has taken half of them, then refills in one go: one
  // wake per prefetch / 2 batches instead of one per batch (each wake is a point where the OS
  // may hand the training thread's core to someone else).
  Job claim() {
    Job job;
    job.seq = claimed++;
    job.epoch = cursor.epoch;
    job.step = cursor.step;
    job.micro = cursor.micro;
    job.announce = job.seq == 0 || (cursor.step == 0 && cursor.micro == 0);
    if (!order || order->epoch != cursor.epoch) {
      order = std::make_shared<EpochOrder>();
      order->epoch = cursor.epoch;
    }
    job.order = order;
    if (!options.device.is_cuda() && reads()) job.batch = take_recycled();
    if (++cursor.micro == options.accumulation) {
      cursor.micro = 0;
      if (++cursor.step == sampler->steps_per_epoch()) {
        cursor.step = 0;
        ++cursor.epoch;
      }
    }
    if (claimed - handed >= options.prefetch) full = true;
    return job;
  }

  // A worker: claims micro-batches in order and reads them, as many at once as there are
  // workers. Each epoch's first job announces the rank's samples to the dataset, whose cache
  // then keeps a block only while a later sample of this rank needs it; the dataset takes the
  // batches' blocks (acquire) in read order, so its counts and cache behave as with one reader,
  // while the rows are copied (fill) on all workers at once.
  void work() {
    const bool cuda = options.device.is_cuda();
    // Read-ahead buffers are host memory (pinned staging on a GPU machine), outside a budget.
    const runtime::UncountedScope host_memory;
#ifdef MPITRAIN_HAVE_NCCL
    // The rank's own device before any CUDA call (pinned buffers, copies): otherwise this
    // thread's calls create a context on device 0.
    if (cuda) c10::cuda::set_device(options.device.index());
#endif
    Dataset::Reading reading;
    const std::int64_t width = options.accumulation * options.batch_size;
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex);
        space.wait(lock, [&] { return stop || failed || !full; });
        if (stop || failed) return;
        job = claim();
      }
      Ready ready;
      std::exception_ptr error;
      // This job's samples: mine[step * width + micro * batch_size, + batch_size).
      std::int64_t first = 0;
      try {
        std::call_once(job.order->once, [&] { job.order->mine = my_order(job.epoch); });
        first = job.step * width + job.micro * options.batch_size;
        if (reads()) {
          if (!job.batch.inputs.defined() && !job.batch.targets.defined())
            job.batch = dataset->allocate(options.batch_size, /*pinned=*/cuda, options.fields);
          const auto& mine = job.order->mine;
          dataset->prepare(c10::ArrayRef<std::int64_t>(mine).slice(static_cast<std::size_t>(first),
                                                                    static_cast<std::size_t>(options.batch_size)),
                           job.batch, reading);
        }
      } catch (...) {
        error = std::current_exception();
      }
      // The dataset's part in read order; the turn passes on whatever happens. The turn is
      // usually a few microseconds away (another worker's acquire): waiting for it asleep
      // would cost a wake-up, as long as a batch's copy on a virtual machine, so spin a few
      // microseconds first, no longer (a worker descheduled meanwhile would waste the core:
      // 4096 spins gave 0.68-0.99x of a raw read at 1 rank, 256 gave 0.86-1.09x).
      for (int spin = 0; spin < 256 && acquired.load(std::memory_order_acquire) != job.seq; ++spin) pause();
      if (acquired.load(std::memory_order_acquire) != job.seq) {
        std::unique_lock<std::mutex> lock(mutex);
        turn.wait(lock, [&] { return stop || acquired.load() == job.seq; });
        if (stop) return;
      }
      if (!error) {
        try {
          if (job.announce) {
            const auto& mine = job.order->mine;
            dataset->expect(c10::ArrayRef<std::int64_t>(mine).slice(static_cast<std::size_t>(first)));
            begin_epoch(job.epoch);
          }
          if (reads()) dataset->acquire(reading);
        } catch (...) {
          error = std::current_exception();
        }
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        acquired.fetch_add(1, std::memory_order_release);
      }
      turn.notify_all();
      try {
        if (error) std::rethrow_exception(error);
        if (reads()) dataset->fill(reading, job.batch);
      } catch (const Error& e) {
        error = std::make_exception_ptr(Error("data loader, rank " + std::to_string(rank) + ", epoch " +
                                                  std::to_string(job.epoch) + " step " + std::to_string(job.step) +
                                                  ": " + e.what(),
                                              e.code()));
      } catch (...) {
        error = std::current_exception();
      }
      ready.batch = std::move(job.batch);
      ready.batch.epoch = job.epoch;
      ready.batch.step = job.step;
      ready.batch.micro = job.micro;
      ready.error = error;
      deliver(job.seq, std::move(ready));
    }
  }

  // Queues a read batch once those before it are queued.
  void deliver(std::int64_t seq, Ready ready) {
    bool wake = false;
    const bool ready_failed = ready.error != nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (ready.error) failed = true;
      done.emplace(seq, std::move(ready));
      const std::size_t before = queue.size();
      for (auto it = done.begin(); it != done.end() && it->first == delivered; it = done.erase(it), ++delivered) {
        Ready& next = it->second;
        // On a GPU the batch waits in pinned host memory: next() copies it to the device one
        // batch ahead, so read-ahead costs host memory, not device memory.
        if (!next.error && !options.device.is_cuda() && reads()) remember(next.batch);
        wake = wake || next.error;
        queue.push_back(std::move(next));
      }
      wake = wake || (before < ready_at() && queue.size() >= ready_at());
    }
    if (wake) changed.notify_all();
    // A failed batch stops the other workers from claiming.
    if (ready_failed) space.notify_all();
  }

  // Starts a queued batch's copy to the device, once.
  void to_device(Ready& ready) {
#ifdef MPITRAIN_HAVE_NCCL
    if (!copy_stream || ready.error || ready.copied) return;
    // The copy runs on the loader's own stream so it overlaps the training step; the event
    // lets next() order the consumer's stream after it.
    c10::cuda::CUDAStreamGuard guard(*copy_stream);
    for (at::Tensor* t : {&ready.batch.inputs, &ready.batch.targets})
      if (t->defined()) *t = t->to(options.device, /*non_blocking=*/true);
    ready.copied = std::make_unique<at::cuda::CUDAEvent>();
    ready.copied->record(*copy_stream);
#else
    (void)ready;
#endif
  }

  void hand_over(Ready& ready) {
#ifdef MPITRAIN_HAVE_NCCL
    if (ready.copied) {
      const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(options.device.index());
      ready.copied->block(current);
      // The memory was allocated on the copy stream; keep the allocator from reusing it
      // before the consumer's stream is done with it.
      for (const at::Tensor* t : {&ready.batch.inputs, &ready.batch.targets})
        if (t->defined()) t->record_stream(current);
    }
#else
    (void)ready;
#endif
  }
};

Loader::Loader(const DatasetSpec& spec, const LoaderOptions& options, int rank, int world_size,
               comm::Communicator& comm)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.options = options;
  m.rank = rank;
  m.world = world_size;
  if (options.batch_size < 1 || options.prefetch < 0 || options.accumulation < 1 || options.workers < 1 ||
      world_size < 1 || rank < 0 || rank >= world_size)
    throw Error("data loader: batch_size (" + std::to_string(options.batch_size) + "), accumulation (" +
                    std::to_string(options.accumulation) + ") and workers (" + std::to_string(options.workers) +
                    ") must be >= 1, prefetch (" + std::to_string(options.prefetch) + ") >= 0, and rank " +
                    std::to_string(rank) + " must lie in a world of " + std::to_string(world_size),
                ExitCode::bad_input);
  if (m.options.shares.empty()) m.options.shares.assign(static_cast<std::size_t>(world_size), options.batch_size);
  check_shares(m.options.shares, world_size);
  m.options.batch_size = m.options.shares[static_cast<std::size_t>(rank)];
  if (options.device.is_cuda()) {
#ifdef MPITRAIN_HAVE_NCCL
    m.copy_stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, options.device.index());
#else
    throw Error("data loader: device " + options.device.str() + " asked for, but this build has no CUDA path",
                ExitCode::bad_input);
#endif
  }
  std::string open_error;
  try {
    m.dataset = std::make_unique<Dataset>(spec);
  } catch (const Error& e) {
    open_error = e.what();
  }
  m.agree(comm, open_error);
  SamplerOptions sampling;
  sampling.global_batch =
      options.accumulation * std::accumulate(m.options.shares.begin(), m.options.shares.end(), std::int64_t{0});
  sampling.seed = options.seed;
  sampling.shuffle = options.shuffle;
  sampling.window = options.shuffle_window;
  sampling.remainder = options.remainder;
  sampling.partitions = options.partitions;
  try {
    m.sampler = std::make_unique<Sampler>(m.dataset->blocks(), sampling);
  } catch (const Error& e) {
    // A token stream's sample count depends on the sequence length, so name it too.
    const std::string samples = spec.kind == Kind::tokens
                                    ? ", samples of data.seq_len " + std::to_string(spec.seq_len) + " tokens"
                                    : "";
    throw Error("data loader, '" + spec.source + "' (" + std::to_string(m.dataset->files().size()) + " file(s)" +
                    samples + "), " + std::to_string(sampling.global_batch) + " samples per batch over " +
                    std::to_string(world_size) + " ranks: " + e.what(),
                e.code());
  }
  m.size_cache();
  if (m.options.prefetch == 0) m.options.prefetch = m.auto_prefetch();
  m.position = {0, 0, 0, options.seed, sampling.global_batch, m.sampler->partitions(), m.dataset->size()};
  m.start(m.position);
}

Loader::~Loader() { impl_->halt(); }

Batch Loader::next() {
  Impl& m = *impl_;
  Ready ready;
  Ready* following = nullptr;
  bool refill = false;
  {
    std::unique_lock<std::mutex> lock(m.mutex);
    if (m.queue.empty()) {
      const auto start = std::chrono::steady_clock::now();
      // Batches read after a failed one may follow it in the queue: an error anywhere in it ends the wait.
      m.changed.wait(lock, [&] {
        return m.queue.size() >= m.ready_at() ||
               std::any_of(m.queue.begin(), m.queue.end(), [](const Ready& r) { return r.error != nullptr; });
      });
      m.starved += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    // An error stays at the front: the loader cannot go on, and every later call says why.
    if (m.queue.front().error) std::rethrow_exception(m.queue.front().error);
    ready = std::move(m.queue.front());
    m.queue.pop_front();
    ++m.handed;
    // Only the pop that reaches the refill mark wakes the workers (see claim).
    refill = m.full && m.claimed - m.handed <= static_cast<std::int64_t>(m.refill_at());
    if (refill) m.full = false;
    // The workers only append, which leaves queued elements where they are.
    following = m.queue.empty() ? nullptr : &m.queue.front();
  }
  if (refill) m.space.notify_all();
  // On a GPU: this batch's copy (unless it started one call ago), then the next one's, which
  // runs while the caller's step does: two batches on the device, whatever the read-ahead.
  m.to_device(ready);
  if (following) m.to_device(*following);
  m.hand_over(ready);
  m.position.epoch = ready.batch.epoch;
  m.position.step = ready.batch.step;
  m.position.micro = ready.batch.micro + 1;
  if (m.position.micro == m.options.accumulation) {
    m.position.micro = 0;
    if (++m.position.step == m.sampler->steps_per_epoch()) {
      m.position.step = 0;
      ++m.position.epoch;
    }
  }
  return std::move(ready.batch);
}

LoaderState Loader::state() const { return impl_->position; }

double Loader::starved_seconds() const { return impl_->starved; }

void Loader::restore(const LoaderState& state) {
  Impl& m = *impl_;
  const LoaderState& here = m.position;
  if (state.seed != here.seed || state.global_batch != here.global_batch || state.partitions != here.partitions ||
      state.samples != here.samples)
    throw Error("data loader state (seed " + std::to_string(state.seed) + ", global batch " +
                    std::to_string(state.global_batch) + ", " + std::to_string(state.partitions) + " partitions, " +
                    std::to_string(state.samples) + " samples) is from a different run than this loader (seed " +
                    std::to_string(here.seed) + ", global batch " + std::to_string(here.global_batch) + ", " +
                    std::to_string(here.partitions) + " partitions, " + std::to_string(here.samples) +
                    " samples): resume with the same seed, data, partitions and global batch (any world size, "
                    "micro-batch and accumulation that keep the global batch)",
                ExitCode::bad_input);
  if (state.epoch < 0 || state.step < 0 || state.step >= m.sampler->steps_per_epoch() || state.micro < 0 ||
      state.micro >= m.options.accumulation)
    throw Error("data loader state epoch " + std::to_string(state.epoch) + " step " + std::to_string(state.step) +
                    " micro-batch " + std::to_string(state.micro) + " is out of range (" +
                    std::to_string(m.sampler->steps_per_epoch()) + " steps per epoch, " +
                    std::to_string(m.options.accumulation) + " micro-batches per step)",
                ExitCode::bad_input);
  m.halt();
  m.position = state;
  m.start(state);
}

void Loader::set_shares(const std::vector<std::int64_t>& shares) {
  Impl& m = *impl_;
  check_shares(shares, m.world);
  if (m.options.accumulation * std::accumulate(shares.begin(), shares.end(), std::int64_t{0}) !=
      m.sampler->options().global_batch)
    throw Error("data loader: new shares must keep the global batch of " +
                    std::to_string(m.sampler->options().global_batch) + " samples",
                ExitCode::bad_input);
  if (m.position.micro != 0)
    throw Error("data loader: shares change between global batches, not after micro-batch " +
                std::to_string(m.position.micro) + " of one");
  if (shares == m.options.shares) return;
  m.halt();
  m.recycled.clear();
  m.options.shares = shares;
  m.options.batch_size = shares[static_cast<std::size_t>(m.rank)];
  m.size_cache();
  m.start(m.position);
}

std::int64_t Loader::batch_size() const { return impl_->options.batch_size; }

int Loader::prefetch() const { return impl_->options.prefetch; }

std::int64_t Loader::steps_per_epoch() const { return impl_->sampler->steps_per_epoch(); }
std::int64_t Loader::global_batch() const { return impl_->sampler->options().global_batch; }
ReadStats Loader::stats() const { return impl_->dataset->stats(); }

ReadStats Loader::stats(std::int64_t epoch) const {
  Impl& m = *impl_;
  const ReadStats now = m.dataset->stats();
  std::lock_guard<std::mutex> lock(m.mutex);
  const auto start = m.epoch_start.find(epoch);
  if (start == m.epoch_start.end()) return {};
  const auto next = std::next(start);
  const ReadStats& end = next == m.epoch_start.end() ? now : next->second;
  return {end.bytes_read - start->second.bytes_read, end.chunks_read - start->second.chunks_read,
          end.cache_hits - start->second.cache_hits};
}
const Dataset& Loader::dataset() const { return *impl_->dataset; }
const Sampler& Loader::sampler() const { return *impl_->sampler; }

}  // namespace mpitrain::data
