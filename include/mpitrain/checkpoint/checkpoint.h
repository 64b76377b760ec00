#pragma once
// Checkpoint directories: atomic writing, verification, finding the newest complete one, and
// rotation. What goes into a checkpoint is the trainer's business; this layer guarantees that
// a checkpoint directory is either complete and intact or never taken for one.
//
// Layout: <root>/step-00000200/ holding the files of one step and manifest.json (written
// last: every file's size and CRC-32). A directory is written as <root>/.step-00000200.tmp,
// its files and the directory fsync'd, then renamed into place and the root fsync'd.
//
// Contract:
// - Writer: the constructor (collective) makes the temporary directory; every rank writes its
//   files into path(); commit() (collective) has rank 0 write the manifest over every file
//   present, fsync, rename, and remove checkpoints beyond the rotation policy — never the new
//   one, and only after the new one is complete. A step saved again (a resumed run reaching a
//   step it had saved) replaces the old directory by an atomic exchange, so a complete one is
//   there at every instant. On a shared file system (multi-node) root must be visible to every
//   rank.
// - The ranks wait for each other at the Writer's barriers for at most `timeout` (the time
//   rank 0 may need to write and checksum the files), then the job ends with
//   ExitCode::comm_timeout naming the checkpoint; nothing half-written is ever taken for a
//   checkpoint.
// - Liveness apart from duration: from the constructor to the end of commit() every rank beats
//   (a thread, on a private communicator; the protocol is written at Writer::Liveness). A rank
//   not heard from for `silence` (ddp.comm_timeout_s), or one whose own write, read or fsync
//   through this layer has not returned for `silence`, ends the job (ExitCode::comm_timeout)
//   naming the rank, its host and what it was doing. A slow save that keeps writing is not
//   stopped before `timeout`. Files written with write_file/write_parts/write_safetensors count
//   as progress: they are written in pieces, and synced to disk every 64 MiB so that the final
//   fsync is short.
// - Fault points (runtime::fault_point) for tests: checkpoint.started (the heartbeat runs,
//   before the first barrier), checkpoint.files_written (a rank's files are written, before
//   the commit barrier), checkpoint.manifest_written (before the rename), checkpoint.renamed
//   (before the rotation), checkpoint.verify (a checkpoint is about to be verified, as a resume
//   does first); checkpoint.slow_writes (runtime::fault_armed) writes 2 KiB per 25 ms.
// - verify() checks a directory against its manifest; find_latest() returns the newest
//   directory that verifies, warning about (and skipping) incomplete or corrupt ones.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace mpitrain::runtime {
class World;
class Logger;
}  // namespace mpitrain::runtime

namespace mpitrain::checkpoint {

struct Rotation {
  std::int64_t keep_last = 3;   // 0: keep all
  std::int64_t keep_every = 0;  // also keep steps that are multiples of this (0: none)
};

class Writer {
 public:
  /// timeout: the longest any rank waits for the others at one of the save's barriers;
  /// silence: the longest any rank may make no progress (ddp.comm_timeout_s).
  Writer(const runtime::World& world, std::string root, std::int64_t step, std::chrono::milliseconds timeout,
         std::chrono::milliseconds silence);
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;
  /// The temporary directory to write files into.
  const std::string& path() const { return temporary_; }
  /// Returns the final directory.
  std::string commit(const Rotation& rotation);

 private:
  class Liveness;
  const runtime::World& world_;
  std::string root_;
  std::int64_t step_;
  std::chrono::milliseconds timeout_;
  std::string temporary_;
  std::string final_;
  std::unique_ptr<Liveness> liveness_;
};

/// "" when the directory is complete and intact, else what is wrong with it.
std::string verify(const std::string& directory);

/// The newest verified checkpoint under root, if any.
std::optional<std::string> find_latest(const std::string& root, const runtime::Logger& log);

/// The step of a checkpoint directory named step-NNNNNNNN, or -1.
std::int64_t step_of(const std::string& directory);

/// Writes a file and fsyncs it (used for every file of a checkpoint).
void write_file(const std::string& path, const std::string& bytes);
/// The same for a file made of several pieces of memory, written one after the other.
struct Part {
  const void* data;
  std::size_t size;
};
void write_parts(const std::string& path, const std::vector<Part>& parts);
void fsync_path(const std::string& path);

}  // namespace mpitrain::checkpoint
