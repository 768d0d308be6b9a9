package dev.fraudstream.peer.features;

import java.util.ArrayList;
import java.util.List;
import java.util.function.ToDoubleFunction;

/** An ordered list of features: a model's input row, or the whole registry for audits. */
public final class FeatureSet {
    private final List<String> names;
    private final List<ToDoubleFunction<Context>> functions;

    private FeatureSet(List<String> names, List<ToDoubleFunction<Context>> functions) {
        this.names = List.copyOf(names);
        this.functions = List.copyOf(functions);
    }

    /** A manifest's feature names; an unknown one is a startup error, never a silent zero. */
    public static FeatureSet resolve(List<String> names) {
        List<ToDoubleFunction<Context>> functions = new ArrayList<>();
        for (int i = 0; i < names.size(); i++) {
            ToDoubleFunction<Context> f = Features.REGISTRY.get(names.get(i));
            if (f == null) {
                throw new IllegalArgumentException("unknown feature `" + names.get(i) + "` (position " + i
                        + " in the manifest); known: " + String.join(", ", Features.REGISTRY.keySet()));
            }
            functions.add(f);
        }
        return new FeatureSet(names, functions);
    }

    /** Every feature of the registry. */
    public static FeatureSet all() {
        return new FeatureSet(List.copyOf(Features.REGISTRY.keySet()), List.copyOf(Features.REGISTRY.values()));
    }

    public List<String> names() {
        return names;
    }

    public int size() {
        return names.size();
    }

    /** The values, as doubles (the model reads them as floats). */
    public double[] values(Context c) {
        double[] out = new double[functions.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = functions.get(i).applyAsDouble(c);
        }
        return out;
    }
}
