#include "mpitrain/runtime/world.h"

#include <cstdlib>

#include "mpitrain/runtime/check.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fatal.h"

namespace mpitrain::runtime {

int launcher_local_rank() {
  // Open MPI, Slurm, MPICH/Hydra, PMIx: the first one set wins.
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID",
                           "PMIX_LOCAL_RANK", "PMI_LOCAL_RANK"}) {
    if (const char* value = std::getenv(name)) return std::atoi(value);
  }
  return -1;
}

namespace {

// Open MPI's non-blocking all-reduce (libnbc) picks an algorithm that runs at about half the
// bandwidth of the blocking MPI_Allreduce for buffers of a MiB and more; its ring algorithm
// matches it (docs/benchmarks.md). MCA parameters are read from the environment at
// MPI_Init, and a value the user set wins.
void prefer_ring_allreduce() {
#ifdef OPEN_MPI
  setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", /*overwrite=*/0);
#endif
}

}  // namespace

World::World(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = MPI_THREAD_SINGLE;
  if (!initialized) {
    prefer_ring_allreduce();
    MPITRAIN_CHECK_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
    owns_mpi_ = true;
  } else {
    MPITRAIN_CHECK_MPI(MPI_Query_thread(&provided));
  }
  // Errors come back as return codes, which the check macros report with rank and host.
  MPITRAIN_CHECK_MPI(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  MPI_Comm world = MPI_COMM_NULL;
  MPITRAIN_CHECK_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &world));
  MPITRAIN_CHECK_MPI(MPI_Comm_rank(world, &rank_));

  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int length = 0;
  MPITRAIN_CHECK_MPI(MPI_Get_processor_name(name, &length));
  host_.assign(name, static_cast<std::size_t>(length));
  set_identity(rank_, host_);
  log_ = Logger(rank_, host_);

  if (provided < MPI_THREAD_MULTIPLE) {
    fatal("the MPI library gives thread level " + std::to_string(provided) +
              ", mpitrain needs MPI_THREAD_MULTIPLE (communicators progress on their own "
              "thread): use an MPI built with thread support (Open MPI: ompi_info | grep "
              "'Thread support')",
          ExitCode::failure);
  }

  join(world);

  const int from_launcher = launcher_local_rank();
  if (from_launcher >= 0 && from_launcher != local_rank_) {
    log_.warn("the launcher says local rank " + std::to_string(from_launcher) +
              " but MPI's shared-memory split says " + std::to_string(local_rank_) +
              "; using " + std::to_string(local_rank_) +
              " (check the launcher's process mapping if GPUs end up shared)");
  }
}

void World::join(MPI_Comm comm) {
  comm_ = comm;
  MPITRAIN_CHECK_MPI(MPI_Comm_rank(comm_, &rank_));
  MPITRAIN_CHECK_MPI(MPI_Comm_size(comm_, &size_));
  MPITRAIN_CHECK_MPI(
      MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node_comm_));
  MPITRAIN_CHECK_MPI(MPI_Comm_rank(node_comm_, &local_rank_));
  MPITRAIN_CHECK_MPI(MPI_Comm_size(node_comm_, &local_size_));
}

std::unique_ptr<World> World::split(int color, int key) const {
  MPI_Comm group = MPI_COMM_NULL;
  MPITRAIN_CHECK_MPI(MPI_Comm_split(comm_, color, key, &group));
  std::unique_ptr<World> sub(new World());
  sub->host_ = host_;
  sub->log_ = log_;
  sub->join(group);
  return sub;
}

World::~World() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (node_comm_ != MPI_COMM_NULL) MPI_Comm_free(&node_comm_);
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  if (owns_mpi_) MPI_Finalize();
}

void World::barrier() const { MPITRAIN_CHECK_MPI(MPI_Barrier(comm_)); }

void World::barrier(std::chrono::milliseconds timeout, const std::string& what) const {
  MPI_Request request = MPI_REQUEST_NULL;
  MPITRAIN_CHECK_MPI(MPI_Ibarrier(comm_, &request));
  wait_or_die(&request, timeout, what);
}

int run_guarded(const World& world, const std::function<int()>& body) {
  ExitCode code = ExitCode::failure;
  std::string message;
  try {
    return body();
  } catch (const Error& e) {
    code = e.code();
    message = e.what();
  } catch (const std::exception& e) {
    message = e.what();
  }
  if (world.size() > 1) fatal(message, code);
  world.log().error(message);
  return to_int(code);
}

}  // namespace mpitrain::runtime
