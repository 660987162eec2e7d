// swift-tools-version:6.1
// Small programs that embed Spindle, each an executable: the README's examples, made to run as
// written, and a scratch-disk tool. Each works in a temporary folder it removes, checks what it
// reads back, and exits with status 1 on any failure. Tools/test.sh builds and runs them all.
// Run one: swift run --package-path Examples quick-start
import Foundation
import PackageDescription

// A path dependency is named after its folder, which is wherever the repository was cloned.
let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
let spindlePackage = repository.lastPathComponent
let spindle = Target.Dependency.product(name: "Spindle", package: spindlePackage)

/// An example program, in Sources/<name>.
func example(_ name: String) -> Target {
    .executableTarget(
        name: name,
        dependencies: [spindle, "ExampleSupport"],
        swiftSettings: [.swiftLanguageMode(.v6)]
    )
}

/// Each example: the executable's name, and its target (its folder in Sources).
let examples: [(product: String, target: String)] = [
    ("quick-start", "QuickStart"),
    ("fault-injection", "FaultInjection"),
    ("raid-rebuild", "RAIDRebuild"),
    ("thin-snapshots", "ThinSnapshots"),
    ("scratch-disk", "ScratchDisk"),
    ("open-by-name", "OpenByName"),
    ("silent-corruption", "SilentCorruption"),
]

let package = Package(
    name: "SpindleExamples",
    platforms: [.macOS(.v15)],
    products: examples.map { .executable(name: $0.product, targets: [$0.target]) },
    dependencies: [
        .package(path: "..")
    ],
    targets: [
        // A temporary folder per run, checks that fail the run, and the exit status.
        .target(
            name: "ExampleSupport",
            dependencies: [spindle],
            swiftSettings: [.swiftLanguageMode(.v6)]
        )
    ] + examples.map { example($0.target) }
)
