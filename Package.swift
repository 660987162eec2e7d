// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "Spindle",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Spindle", targets: ["Spindle"]),
        .executable(name: "spindle", targets: ["SpindleCLI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        // liburing, the io_uring library. Its header is imported through a shim that pulls the C
        // library headers in first, so their definitions match the ones Swift's Glibc module sees.
        .systemLibrary(
            name: "CLibURing",
            pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]
        ),
        // Intel ISA-L: XOR parity (xor_gen, xor_check) and CRC32C (crc32_iscsi).
        .systemLibrary(
            name: "CISAL",
            pkgConfig: "libisal",
            providers: [.apt(["libisal-dev"])]
        ),
        // GnuTLS: TLS for the NBD server (NBD_OPT_STARTTLS), with certificates or pre-shared keys.
        .systemLibrary(
            name: "CGnuTLS",
            pkgConfig: "gnutls",
            providers: [.apt(["libgnutls28-dev"])]
        ),
        // The engine's narrow C interface to liburing; liburing's own headers stay inside it.
        .target(
            name: "CSpindleRing",
            dependencies: ["CLibURing"]
        ),
        // Linux constants and calls that Swift's Glibc module hides behind _GNU_SOURCE
        // (O_DIRECT, fallocate modes, RWF_DSYNC, statx's direct-I/O alignment).
        .target(
            name: "CSpindleShims",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        .target(
            name: "Spindle",
            dependencies: ["CSpindleRing", "CSpindleShims", "CISAL", "CGnuTLS"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "SpindleCLI",
            dependencies: [
                "Spindle",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .testTarget(
            name: "SpindleTests",
            dependencies: ["Spindle", "SpindleCLI"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)
