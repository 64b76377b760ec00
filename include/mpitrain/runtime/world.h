#pragma once
// The job as seen by one process.
//
// Contract:
// - One World per process, created in main() and passed down (never reached as a global).
//   It initialises MPI with MPI_THREAD_MULTIPLE (communicators progress on their own threads;
//   a library that cannot give it is an error that says so) and finalizes MPI when destroyed,
//   if it was the one that initialised it.
// - comm() is a private duplicate of MPI_COMM_WORLD: mpitrain's traffic never matches a
//   user's messages on MPI_COMM_WORLD.
// - local_rank()/local_size() come from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), i.e. the
//   ranks that share this node. Launcher variables (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID,
//   ...) are only compared with it, and a disagreement is a warning.
// - Started without mpirun it is a world of one.
// - split() makes a group of ranks (a pipeline stage's replicas, one replica's stages) that is
//   a World of its own: rank(), size(), comm() and the node layout are the group's; log()
//   stays the process's, so messages keep naming the global rank. A group never owns MPI.

#include <mpi.h>

#include <chrono>
#include <memory>
#include <string>

#include "mpitrain/runtime/log.h"

namespace mpitrain::runtime {

class World {
 public:
  World(int* argc, char*** argv);
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  bool is_root() const { return rank_ == 0; }
  const std::string& host() const { return host_; }
  MPI_Comm comm() const { return comm_; }
  MPI_Comm node_comm() const { return node_comm_; }
  const Logger& log() const { return log_; }

  /// The ranks with the same color, ordered by key then by rank here. Collective over this world.
  std::unique_ptr<World> split(int color, int key) const;

  /// Blocks until every rank arrives. Plain MPI on the world communicator.
  void barrier() const;
  /// The same, but a rank still waiting after `timeout` ends the job (ExitCode::comm_timeout)
  /// with a message naming `what`: for waits whose length is known, such as a checkpoint save.
  void barrier(std::chrono::milliseconds timeout, const std::string& what) const;

 private:
  World() = default;
  void join(MPI_Comm comm);  // takes comm; sets rank, size and the node layout

  bool owns_mpi_ = false;
  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm node_comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
  std::string host_;
  Logger log_{0, ""};
};

/// Reads the launcher's idea of this process's node-local rank, or -1 when no known launcher
/// variable is set. Exposed for the cross-check and its test.
int launcher_local_rank();

}  // namespace mpitrain::runtime
