package errcode

// Prerequisites (E1xx).
const (
	MissingTool        Code = "E101" // a host program such as mkfs.ext4 is not installed
	KVMUnavailable     Code = "E102" // /dev/kvm is missing or does not work
	GuestBinaryMissing Code = "E103" // hyphae-init or dimension-agent cannot be found
	GuestBinaryDynamic Code = "E104" // a guest binary is dynamically linked
	NotRoot            Code = "E105" // the operation needs root
	VMMUnavailable     Code = "E106" // no usable VMM (firecracker, qemu) on this host
)

// Configuration (E2xx).
const (
	InvalidArgument Code = "E201" // a flag or argument is malformed
	InvalidSpec     Code = "E202" // a VM spec failed validation
	InvalidEnv      Code = "E203" // an environment entry is malformed
	InvalidName     Code = "E204" // an image name or tag is malformed
	InvalidManifest Code = "E205" // a manifest or config file is malformed
)

// Processes (E3xx).
const (
	SpawnFailed   Code = "E301" // a child process could not be started
	Timeout       Code = "E302" // a bounded wait ran out
	ProcessFailed Code = "E303" // a child process exited with an error
	InitFatal     Code = "E304" // hyphae-init hit a fatal error in the guest
	APIError      Code = "E305" // a VMM API call failed
)

// Root filesystems (E4xx).
const (
	ProjectBuildFailed Code = "E401" // the project's own build (cargo, go) failed
	NoProjectMarker    Code = "E402" // no package.json, Cargo.toml or go.mod found
	AmbiguousProject   Code = "E403" // several markers, or several binary targets
	UnsafeArchiveEntry Code = "E404" // an archive entry would escape the root
	MalformedArchive   Code = "E405" // an archive or image config cannot be read
	SizeLimit          Code = "E406" // a declared or actual size is over a bound
	MkfsFailed         Code = "E407" // mkfs.ext4 failed
	NoEntrypoint       Code = "E408" // no entrypoint could be found or derived
	StagingFailed      Code = "E409" // writing the staged tree failed
	RuntimeNotFound    Code = "E410" // a language runtime (node) was not found
)

// Registry (E5xx).
const (
	NotFound      Code = "E501" // no image, kernel or VM by that reference
	InUse         Code = "E502" // refused while a VM uses the object
	RegistryError Code = "E503" // the database failed
	Conflict      Code = "E504" // a concurrent change won
	Corrupt       Code = "E505" // the database or a stored file is damaged
)

// Dimension store (E5xx, after the registry's). A missing user, key,
// bundle, invocation or job is NotFound; a run already in a final state is
// Conflict.
const (
	StoreError      Code = "E506" // the dimension store's database failed
	AlreadyExists   Code = "E507" // a user name or bundle name:tag is taken
	LastAdmin       Code = "E508" // the change would leave no enabled admin
	Unauthenticated Code = "E509" // an API key is malformed, unknown, revoked or its user disabled
)

// Orchestration (E6xx).
const (
	VMNotFound    Code = "E601" // no VM by that id
	VMNotRunning  Code = "E602" // the VM is not running
	ChannelFailed Code = "E603" // the host↔guest channel could not be opened
	BootFailed    Code = "E604" // the guest did not boot
	StopFailed    Code = "E605" // the VM could not be stopped
)

// Kernels (E7xx).
const (
	InvalidKernel     Code = "E701" // not an ELF vmlinux or bzImage
	KernelNotFound    Code = "E702" // no kernel by that name or path
	KernelUnsupported Code = "E703" // the chosen VMM cannot boot this kernel
	FetchFailed       Code = "E704" // downloading a kernel failed
	ChecksumMismatch  Code = "E705" // a download's SHA-256 differs
	ModulesNotFound   Code = "E706" // a kernel's modules tree, or a module in it, is missing
	ConfigNotFound    Code = "E707" // a kernel's build configuration is neither embedded nor beside it
)

// Networking and the jailer (E8xx).
const (
	PoolExhausted Code = "E801" // no free address in the pool
	TapExists     Code = "E802" // the TAP name is taken
	NetlinkFailed Code = "E803" // a netlink operation failed
	NftFailed     Code = "E804" // an nftables operation failed
	SysctlFailed  Code = "E805" // a kernel setting (sysctl) could not be read or changed
	JailFailed    Code = "E810" // the jailer could not be prepared or run
)

// Dimension host↔guest protocol and agent (E9xx).
const (
	FrameTooLarge     Code = "E901" // a frame declares a length over its cap
	MalformedFrame    Code = "E902" // a frame is truncated or cannot be decoded
	ProtocolViolation Code = "E903" // a peer sent a message out of order
)

// Dimension event log (E92x).
const (
	EventLogFailed Code = "E920" // the event log (NATS JetStream) is unreachable or failed
	RunFinished    Code = "E921" // an event was appended after the run's completed event
)

// Dimension runner (E93x).
const (
	CapacityExceeded Code = "E930" // every run permit is taken
	Draining         Code = "E931" // the runner is shutting down and takes no new runs
)
