package dev.fraudstream.peer;

import ai.onnxruntime.OnnxTensor;
import ai.onnxruntime.OrtEnvironment;
import ai.onnxruntime.OrtException;
import ai.onnxruntime.OrtSession;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import dev.fraudstream.peer.features.FeatureSet;
import java.io.IOException;
import java.nio.FloatBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * A fraudstream model: the manifest (version, ordered feature names, thresholds) and its ONNX
 * file, scored in-process by ONNX Runtime one transaction at a time (a Kafka Streams
 * processor sees one record at a time). One session serves every stream thread: ONNX
 * Runtime's {@code run} is thread-safe.
 */
public final class Model {
    private final String version;
    private final FeatureSet features;
    private final double review;
    private final double decline;
    private final OrtEnvironment env;
    private final OrtSession session;
    private final String input;
    private final Set<String> output;
    private final int outputColumn;

    private Model(JsonNode manifest, OrtEnvironment env, OrtSession session) {
        this.version = manifest.path("model_version").asText();
        List<String> names = new ArrayList<>();
        manifest.path("features").forEach(n -> names.add(n.asText()));
        this.features = FeatureSet.resolve(names);
        this.review = manifest.path("thresholds").path("review").asDouble();
        this.decline = manifest.path("thresholds").path("decline").asDouble();
        this.env = env;
        this.session = session;
        this.input = manifest.path("input").asText();
        this.output = Set.of(manifest.path("output").asText());
        this.outputColumn = manifest.path("output_column").asInt();
    }

    /** Loads a manifest and the ONNX file it names (beside it), refusing one whose SHA-256 differs. */
    public static Model load(Path manifestPath) throws IOException, OrtException {
        JsonNode manifest = new ObjectMapper().readTree(manifestPath.toFile());
        Path onnx = manifestPath.resolveSibling(manifest.path("onnx").asText());
        byte[] bytes = Files.readAllBytes(onnx);
        String want = manifest.path("onnx_sha256").asText();
        if (!want.equals(sha256(bytes))) {
            throw new IOException(onnx + " does not have the SHA-256 its manifest names (" + want + ")");
        }
        OrtEnvironment env = OrtEnvironment.getEnvironment();
        OrtSession.SessionOptions options = new OrtSession.SessionOptions();
        // As fraudstream configures it: the stream threads are the parallelism.
        options.setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT);
        options.setIntraOpNumThreads(1);
        options.setInterOpNumThreads(1);
        return new Model(manifest, env, env.createSession(bytes, options));
    }

    private static String sha256(byte[] bytes) {
        try {
            return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(bytes));
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    public String version() {
        return version;
    }

    /** The model's input row layout. */
    public FeatureSet features() {
        return features;
    }

    /** The fraud probability of one row of {@link #features()} values. */
    public float score(double[] row) throws OrtException {
        float[] input32 = new float[row.length];
        for (int i = 0; i < row.length; i++) {
            input32[i] = (float) row[i];
        }
        try (OnnxTensor tensor = OnnxTensor.createTensor(env, FloatBuffer.wrap(input32), new long[] {1, row.length});
                OrtSession.Result result = session.run(Map.of(input, tensor), output)) {
            float[][] probabilities = (float[][]) result.get(0).getValue();
            return probabilities[0][outputColumn];
        }
    }

    /** The manifest's thresholds are inclusive lower bounds, as in fraudstream. */
    public String decide(float score) {
        if (score >= decline) {
            return "decline";
        }
        return score >= review ? "review" : "approve";
    }
}
