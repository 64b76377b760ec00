#include "mpitrain/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <ftw.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "mpitrain/runtime/check.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fatal.h"
#include "mpitrain/runtime/fault.h"
#include "mpitrain/runtime/log.h"
#include "mpitrain/runtime/world.h"

namespace fs = std::filesystem;

namespace mpitrain::checkpoint {
namespace {

using Clock = std::chrono::steady_clock;

// This process's checkpoint I/O as the save's liveness thread sees it: bytes written (or read
// to checksum) so far, and since when the current write, read or fsync has not returned.
struct Progress {
  std::atomic<std::int64_t> bytes{0};
  std::atomic<Clock::rep> io_since{0};  // 0: not inside an I/O call
};

Progress& progress() {
  static Progress p;
  return p;
}

// Marks one I/O system call, so a call that never returns is seen by the liveness thread.
class IoCall {
 public:
  IoCall() { progress().io_since.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed); }
  ~IoCall() { progress().io_since.store(0, std::memory_order_relaxed); }
  IoCall(const IoCall&) = delete;
  IoCall& operator=(const IoCall&) = delete;
};

void count_bytes(std::int64_t bytes) { progress().bytes.fetch_add(bytes, std::memory_order_relaxed); }

// Writes are cut into pieces this large, so each system call is short and progress is seen
// while a large file is written; every kSyncEvery bytes the data goes to disk, so the final
// fsync, which writes no counted bytes, never has much to flush.
constexpr std::size_t kPiece = std::size_t{8} << 20;
constexpr std::size_t kSyncEvery = std::size_t{64} << 20;
// The fault point checkpoint.slow_writes: a file system that writes 80 KB/s but keeps going.
constexpr std::size_t kSlowPiece = 2048;
constexpr std::chrono::milliseconds kSlowPause{25};

std::string system_error(const std::string& doing, const std::string& path) {
  return "cannot " + doing + " '" + path + "': " + std::strerror(errno);
}

std::string step_name(std::int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", static_cast<long long>(step));
  return name;
}

std::uint32_t crc_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> buffer(1 << 20);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (in) {
    {
      const IoCall io;
      in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    }
    count_bytes(in.gcount());
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buffer.data()), static_cast<uInt>(in.gcount()));
  }
  return static_cast<std::uint32_t>(crc);
}

// std::filesystem::remove_all would resolve to the copy that libtorch.so exports, which
// crashes when it has something to remove; POSIX nftw does the same job.
void remove_tree(const std::string& path) {
  if (!fs::exists(path)) return;
  const auto remove_entry = [](const char* entry, const struct stat*, int, struct FTW*) { return ::remove(entry); };
  if (::nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
    throw runtime::Error("cannot remove '" + path + "': check permissions on the checkpoint folder");
}

void rotate(const std::string& root, std::int64_t newest, const Rotation& rotation) {
  if (rotation.keep_last <= 0) return;
  std::vector<std::int64_t> steps;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::int64_t step = step_of(entry.path().string());
    if (step >= 0 && step <= newest) steps.push_back(step);
  }
  std::sort(steps.rbegin(), steps.rend());
  for (std::size_t i = static_cast<std::size_t>(rotation.keep_last); i < steps.size(); ++i) {
    if (steps[i] == newest) continue;
    if (rotation.keep_every > 0 && steps[i] % rotation.keep_every == 0) continue;
    remove_tree((fs::path(root) / step_name(steps[i])).string());
  }
}

// Moves the finished directory into place. When the step exists already (a resumed run saving
// a step it had saved), the two are exchanged atomically, so the old one is never gone before
// the new one is there; the old one is left under a temporary name. File systems without
// renameat2's flags (EINVAL) get a plain rename, with the old directory moved aside first.
void publish(const std::string& temporary, const std::string& final) {
  if (::renameat2(AT_FDCWD, temporary.c_str(), AT_FDCWD, final.c_str(), RENAME_NOREPLACE) == 0) return;
  if (errno == EEXIST && ::renameat2(AT_FDCWD, temporary.c_str(), AT_FDCWD, final.c_str(), RENAME_EXCHANGE) == 0)
    return;
  if (errno == EINVAL) {
    const std::string aside = temporary + ".old";
    if ((!fs::exists(final) || ::rename(final.c_str(), aside.c_str()) == 0) &&
        ::rename(temporary.c_str(), final.c_str()) == 0)
      return;
  }
  throw runtime::Error("cannot rename '" + temporary + "' to '" + final + "': " + std::strerror(errno) +
                       ". The previous checkpoints are untouched; check the checkpoint folder's file system");
}

// Temporary directories left by saves that were killed, or by publish(): none is a checkpoint.
void remove_temporaries(const std::string& root) {
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(".step-", 0) == 0 && name.find(".tmp") != std::string::npos) remove_tree(entry.path().string());
  }
}

// What a rank is doing in a save, as its heartbeat reports it.
enum class Phase : std::int64_t { starting, writing, waiting_files, publishing, waiting_publish };

const char* phase_text(std::int64_t phase) {
  switch (static_cast<Phase>(phase)) {
    case Phase::starting: return "starting the save";
    case Phase::writing: return "writing its files";
    case Phase::waiting_files: return "waiting for every rank's files";
    case Phase::publishing: return "writing the manifest and renaming the checkpoint into place";
    case Phase::waiting_publish: return "waiting for rank 0 to finish the checkpoint";
  }
  return "saving";
}

}  // namespace

// The save's liveness channel: a thread per rank that beats on a private communicator while
// the save runs, so that a rank that stops (SIGSTOP, a dead node, a hung file system) ends the
// job within `limit` (ddp.comm_timeout_s) instead of the save's overall bound.
// Protocol, rank 0 the hub:
// 1. Start (collective, bounded by limit): duplicate the world communicator, gather hosts.
// 2. Every `period` each rank sends rank 0 a beat {sequence, bytes written, phase}; rank 0 sends
//    every other rank its own. A send still pending from the last beat is not repeated (its
//    receiver is not listening: the silence check below will name it).
// 3. A rank that has heard nothing from a partner (rank 0: every rank; the others: rank 0) for
//    `limit` ends the job naming the partner, its host and what it last said it was doing.
// 4. A rank whose own write, read or fsync has not returned for `limit` ends the job itself:
//    stuck in the file system it still beats, but it writes no bytes.
// 5. Close (after the save's last barrier): each rank sends a final beat (sequence -1) and
//    listens until every partner's final beat has come, so no message is in flight when the
//    communicator is freed. Without close (an exception unwinding the save, which then ends
//    the job) the thread stops at once and the communicator is left to the ending process.
class Writer::Liveness {
 public:
  Liveness(const runtime::World& world, std::string checkpoint, std::chrono::milliseconds limit)
      : rank_(world.rank()), size_(world.size()), checkpoint_(std::move(checkpoint)), limit_(limit),
        period_(std::clamp<std::chrono::milliseconds>(limit / 8, std::chrono::milliseconds(20),
                                                       std::chrono::milliseconds(1000))) {
    if (size_ == 1) return;
    MPI_Request request = MPI_REQUEST_NULL;
    MPITRAIN_CHECK_MPI(MPI_Comm_idup(world.comm(), &comm_, &request));
    runtime::wait_or_die(&request, limit_, "checkpoint " + checkpoint_ + ": starting the save's heartbeat");
    std::array<char, kHostChars> mine{};
    world.host().copy(mine.data(), kHostChars - 1);
    hosts_.assign(static_cast<std::size_t>(size_) * kHostChars, '\0');
    MPITRAIN_CHECK_MPI(MPI_Iallgather(mine.data(), kHostChars, MPI_CHAR, hosts_.data(), kHostChars, MPI_CHAR, comm_,
                                      &request));
    runtime::wait_or_die(&request, limit_, "checkpoint " + checkpoint_ + ": gathering the ranks' hosts");
    thread_ = std::thread([this] {
      try {
        run();
      } catch (const std::exception& e) {
        runtime::fatal("checkpoint " + checkpoint_ + ": the save's heartbeat thread failed: " + e.what());
      }
    });
  }

  ~Liveness() {
    if (!thread_.joinable()) return;  // closed, or a world of one
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = Stop::abrupt;
    }
    changed_.notify_all();
    thread_.join();
  }

  Liveness(const Liveness&) = delete;
  Liveness& operator=(const Liveness&) = delete;

  void set_phase(Phase phase) { phase_.store(static_cast<std::int64_t>(phase), std::memory_order_relaxed); }

  // Collective: every rank calls it after the save's last barrier.
  void close() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = Stop::close;
    }
    changed_.notify_all();
    thread_.join();
    MPITRAIN_CHECK_MPI(MPI_Comm_free(&comm_));
  }

 private:
  enum class Stop { no, close, abrupt };
  static constexpr int kHostChars = 64;
  static constexpr int kFields = 3;  // sequence (-1: the last beat), bytes, phase
  using Beat = std::array<std::int64_t, kFields>;

  struct Link {
    int rank = 0;
    Beat in{}, out{}, heard{};
    MPI_Request receive = MPI_REQUEST_NULL, send = MPI_REQUEST_NULL;
    Clock::time_point last_heard;
    bool ended = false;  // its last beat came
  };

  std::string who(int rank) const {
    return "rank " + std::to_string(rank) + " (" + std::string(hosts_.data() + static_cast<std::size_t>(rank) * kHostChars) + ")";
  }

  // Bytes this rank has written (or read back to checksum) since the save began.
  std::int64_t saved() const { return progress().bytes.load(std::memory_order_relaxed) - bytes_before_; }

  static bool done(MPI_Request& request) {
    if (request == MPI_REQUEST_NULL) return true;
    int flag = 0;
    MPITRAIN_CHECK_MPI(MPI_Test(&request, &flag, MPI_STATUS_IGNORE));
    return flag != 0;
  }

  void listen(Link& link) {
    MPITRAIN_CHECK_MPI(MPI_Irecv(link.in.data(), kFields, MPI_INT64_T, link.rank, 0, comm_, &link.receive));
  }

  void beat(Link& link, std::int64_t sequence) {
    link.out = {sequence, saved(), phase_.load(std::memory_order_relaxed)};
    MPITRAIN_CHECK_MPI(MPI_Isend(link.out.data(), kFields, MPI_INT64_T, link.rank, 0, comm_, &link.send));
  }

  void check(const std::vector<Link>& links, Clock::time_point now) const {
    const auto seconds = [](Clock::duration d) {
      char text[32];
      std::snprintf(text, sizeof text, "%.1f", std::chrono::duration<double>(d).count());
      return std::string(text);
    };
    const Clock::rep since = progress().io_since.load(std::memory_order_relaxed);
    if (since != 0 && now - Clock::time_point(Clock::duration(since)) > limit_)
      runtime::fatal("checkpoint " + checkpoint_ + ": one write, read or fsync on " + runtime::where() + " has not returned for " +
                         seconds(now - Clock::time_point(Clock::duration(since))) + " s while " +
                         phase_text(phase_.load()) + " (" + std::to_string(saved()) +
                         " bytes done): the file system is not answering (ddp.comm_timeout_s bounds a save's "
                         "silence). The checkpoints already there are untouched",
                     runtime::ExitCode::comm_timeout);
    for (const Link& link : links) {
      if (link.ended || now - link.last_heard <= limit_) continue;
      const bool ever = link.heard[0] > 0;
      runtime::fatal("checkpoint " + checkpoint_ + ": " + who(link.rank) + " has not answered the save's heartbeat for " +
                         seconds(now - link.last_heard) + " s" +
                         (ever ? std::string(" (last heard ") + phase_text(link.heard[2]) + ", " +
                                     std::to_string(link.heard[1]) + " bytes written)"
                               : std::string(" (never heard during this save)")) +
                         ": it is stopped, dead or cut off. Ending the job from " + runtime::where() +
                         " (ddp.comm_timeout_s bounds a save's silence, checkpoint.save_timeout_s its length); "
                         "the checkpoints already there are untouched",
                     runtime::ExitCode::comm_timeout);
    }
  }

  void run() {
    std::vector<Link> links;
    for (int r = 0; r < size_; ++r)
      if (r != rank_ && (rank_ == 0 || r == 0)) {
        Link link;
        link.rank = r;
        links.push_back(link);
      }
    for (Link& link : links) {
      link.last_heard = Clock::now();
      listen(link);
    }
    std::int64_t sequence = 0;
    Clock::time_point next_beat = Clock::now();
    bool last_sent = false;
    for (Stop stop = Stop::no;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        stop = stop_;
      }
      if (stop == Stop::abrupt) return abandon(links);
      const Clock::time_point now = Clock::now();
      for (Link& link : links) {
        if (link.ended || !done(link.receive)) continue;
        link.last_heard = now;
        if (link.in[0] < 0) {
          link.ended = true;
        } else {
          link.heard = link.in;
          listen(link);
        }
      }
      if (stop == Stop::close && !last_sent) {
        for (Link& link : links) {
          runtime::Backoff backoff;  // a small send completes at once unless its receiver is gone
          while (!done(link.send)) {
            check(links, Clock::now());
            backoff.pause();
          }
          beat(link, -1);
        }
        last_sent = true;
      } else if (!last_sent && now >= next_beat) {
        ++sequence;
        for (Link& link : links)
          if (done(link.send)) beat(link, sequence);
        next_beat = now + period_;
      }
      if (last_sent && std::all_of(links.begin(), links.end(), [](Link& l) { return l.ended && done(l.send); })) return;
      check(links, now);
      std::unique_lock<std::mutex> lock(mutex_);
      // While closing, partners' last beats are due any moment: look often.
      changed_.wait_for(lock, last_sent ? std::chrono::milliseconds(1) : period_ / 4,
                        [&] { return stop_ == Stop::abrupt || (stop_ == Stop::close && !last_sent); });
    }
  }

  // Stops without the closing handshake: receives are cancelled, sends left to complete.
  static void abandon(std::vector<Link>& links) {
    for (Link& link : links) {
      if (link.receive != MPI_REQUEST_NULL && !link.ended) {
        MPI_Cancel(&link.receive);
        MPI_Request_free(&link.receive);
      }
      if (link.send != MPI_REQUEST_NULL) MPI_Request_free(&link.send);
    }
  }

  const int rank_;
  const int size_;
  const std::string checkpoint_;
  const std::chrono::milliseconds limit_;
  const std::chrono::milliseconds period_;
  const std::int64_t bytes_before_ = progress().bytes.load();
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::vector<char> hosts_;
  std::atomic<std::int64_t> phase_{static_cast<std::int64_t>(Phase::starting)};
  std::mutex mutex_;
  std::condition_variable changed_;
  Stop stop_ = Stop::no;
  std::thread thread_;
};

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw runtime::Error("cannot open '" + path + "' to sync it to disk");
  int rc = 0;
  {
    const IoCall io;
    rc = ::fsync(fd);
  }
  ::close(fd);
  if (rc != 0) throw runtime::Error("fsync of '" + path + "' failed: the file system may be full or read-only");
}

void write_parts(const std::string& path, const std::vector<Part>& parts) {
  const std::string advice = ": check free space and permissions";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw runtime::Error(system_error("write", path) + advice);
  struct Closer {
    int fd;
    ~Closer() {
      if (fd >= 0) ::close(fd);
    }
  } closer{fd};
  const bool slow = runtime::fault_armed("checkpoint.slow_writes");
  const std::size_t piece = slow ? kSlowPiece : kPiece;
  std::size_t unsynced = 0;
  for (const Part& part : parts) {
    const char* data = static_cast<const char*>(part.data);
    for (std::size_t done = 0; done < part.size;) {
      ssize_t written = 0;
      {
        const IoCall io;
        written = ::write(fd, data + done, std::min(piece, part.size - done));
      }
      if (written < 0) {
        if (errno == EINTR) continue;
        throw runtime::Error(system_error("write", path) + advice);
      }
      done += static_cast<std::size_t>(written);
      unsynced += static_cast<std::size_t>(written);
      count_bytes(written);
      if (unsynced >= kSyncEvery) {
        const IoCall io;
        if (::fdatasync(fd) != 0) throw runtime::Error(system_error("write", path) + advice);
        unsynced = 0;
      }
      if (slow) std::this_thread::sleep_for(kSlowPause);
    }
  }
  {
    const IoCall io;
    if (::fsync(fd) != 0) throw runtime::Error(system_error("write", path) + advice);
  }
  closer.fd = -1;
  if (::close(fd) != 0) throw runtime::Error(system_error("write", path) + advice);
}

void write_file(const std::string& path, const std::string& bytes) { write_parts(path, {{bytes.data(), bytes.size()}}); }

std::int64_t step_of(const std::string& directory) {
  const std::string name = fs::path(directory).filename().string();
  if (name.size() != 13 || name.rfind("step-", 0) != 0) return -1;
  for (std::size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::stoll(name.substr(5));
}

Writer::Writer(const runtime::World& world, std::string root, std::int64_t step, std::chrono::milliseconds timeout,
               std::chrono::milliseconds silence)
    : world_(world), root_(std::move(root)), step_(step), timeout_(timeout) {
  temporary_ = (fs::path(root_) / ("." + step_name(step) + ".tmp")).string();
  final_ = (fs::path(root_) / step_name(step)).string();
  liveness_ = std::make_unique<Liveness>(world_, final_, silence);
  runtime::fault_point("checkpoint.started", world_.rank());
  if (world_.is_root()) {
    fs::create_directories(root_);
    remove_tree(temporary_);  // a save that was killed half-way
    fs::create_directories(temporary_);
  }
  world_.barrier(timeout_, "checkpoint " + final_ + ": waiting for rank 0 to create the folder");
  liveness_->set_phase(Phase::writing);
}

Writer::~Writer() = default;

std::string Writer::commit(const Rotation& rotation) {
  runtime::fault_point("checkpoint.files_written", world_.rank());
  liveness_->set_phase(Phase::waiting_files);
  world_.barrier(timeout_, "checkpoint " + final_ + ": waiting for every rank's files");
  if (world_.is_root()) {
    liveness_->set_phase(Phase::publishing);
    nlohmann::json files = nlohmann::json::object();
    for (const auto& entry : fs::directory_iterator(temporary_)) {
      const std::string path = entry.path().string();
      files[entry.path().filename().string()] = {{"bytes", fs::file_size(path)}, {"crc32", crc_of(path)}};
    }
    write_file((fs::path(temporary_) / "manifest.json").string(),
               nlohmann::json{{"step", step_}, {"world_size", world_.size()}, {"files", files}}.dump(2));
    fsync_path(temporary_);
    runtime::fault_point("checkpoint.manifest_written", world_.rank());
    publish(temporary_, final_);
    fsync_path(root_);
    runtime::fault_point("checkpoint.renamed", world_.rank());
    remove_temporaries(root_);
    rotate(root_, step_, rotation);
  }
  liveness_->set_phase(Phase::waiting_publish);
  world_.barrier(timeout_, "checkpoint " + final_ + ": waiting for rank 0 to finish it");
  liveness_->close();
  return final_;
}

std::string verify(const std::string& directory) {
  runtime::fault_point("checkpoint.verify");
  const fs::path manifest_path = fs::path(directory) / "manifest.json";
  if (!fs::exists(manifest_path)) return "no manifest.json (the save did not finish)";
  nlohmann::json manifest;
  try {
    std::ifstream in(manifest_path);
    manifest = nlohmann::json::parse(in);
    for (const auto& [name, entry] : manifest.at("files").items()) {
      // Only plain names: a manifest must not point the checks at files outside its folder.
      if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
        return "the manifest names the file \"" + name + "\", which is not a file in the checkpoint";
      const fs::path file = fs::path(directory) / name;
      if (!fs::exists(file)) return "file " + name + " is missing";
      if (fs::file_size(file) != entry.at("bytes").get<std::uintmax_t>())
        return "file " + name + " has " + std::to_string(fs::file_size(file)) + " bytes, the manifest says " +
               std::to_string(entry.at("bytes").get<std::uintmax_t>());
      if (crc_of(file.string()) != entry.at("crc32").get<std::uint32_t>()) return "file " + name + " fails its CRC-32 check";
    }
  } catch (const std::exception& e) {
    return std::string("unreadable manifest.json (") + e.what() + ")";
  }
  return "";
}

std::optional<std::string> find_latest(const std::string& root, const runtime::Logger& log) {
  if (!fs::exists(root)) return std::nullopt;
  std::vector<std::pair<std::int64_t, std::string>> candidates;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::int64_t step = step_of(entry.path().string());
    if (step >= 0) candidates.emplace_back(step, entry.path().string());
  }
  std::sort(candidates.rbegin(), candidates.rend());
  for (const auto& [step, path] : candidates) {
    const std::string problem = verify(path);
    if (problem.empty()) return path;
    log.warn("skipping checkpoint " + path + ": " + problem);
  }
  return std::nullopt;
}

}  // namespace mpitrain::checkpoint
